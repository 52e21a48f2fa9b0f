"""The fast CPU path (util/fast_crop.py): MAE's crop distribution on uint8, reduced-size JPEG decoding with the
crop box mapped exactly, normalisation on the device, bad files (issue #9)."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

from benchmarks.photos import shipped_photos
from util.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RobustImageDataset, build_train_data
from util.fast_crop import (
    FastRandomResizedCrop,
    NormalizeOnDevice,
    TorchvisionCropBox,
    dct_scale,
    normalize_pixels,
    resized_crop,
)

SIZE = 64


def reference(scale=(0.2, 1.0)):
    """Today's path up to the uint8 image: RandomResizedCrop (bicubic) + flip on the PIL image."""
    return transforms.Compose([
        transforms.RandomResizedCrop(SIZE, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip()])


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def jpeg(image: Image.Image, path=None, quality=90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut():
    return Image.open(shipped_photos()[0]).convert("RGB")  # 512 x 512 photo


def coordinate_image(width=640, height=480) -> Image.Image:
    """Red encodes x and green y (smooth ramps survive JPEG), so an output's corners reveal its crop box."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def recovered_crop(out: torch.Tensor, width=640, height=480):
    """(scale, log aspect ratio, flipped) of the crop an output shows; edge pixel centres sit half an output
    pixel inside the box, hence SIZE / (SIZE - 1)."""
    red, green = out[0].float(), out[1].float()
    left, right = red[:, 0].mean().item() / 255 * (width - 1), red[:, -1].mean().item() / 255 * (width - 1)
    top, bottom = green[0].mean().item() / 255 * (height - 1), green[-1].mean().item() / 255 * (height - 1)
    w, h = abs(right - left) * SIZE / (SIZE - 1), (bottom - top) * SIZE / (SIZE - 1)
    return w * h / (width * height), float(np.log(w / h)), left > right


def test_crop_scale_and_aspect_distributions_match_the_reference(tmp_path):
    """Independent seeds for the two paths: scale and aspect-ratio samples pass a two-sample KS test, the flip
    rate is a half; with the same seeds, each crop is the reference's crop."""
    path = tmp_path / "coords.jpg"
    jpeg(coordinate_image(), path, quality=95)
    fast, ref, n = FastRandomResizedCrop(SIZE), reference(), 300
    image = Image.open(path).convert("RGB")

    def crops(transform, seeds, source):
        result = []
        for seed in seeds:
            torch.manual_seed(seed)
            out = transform(source)
            result.append(recovered_crop(out if isinstance(out, torch.Tensor) else as_tensor(out)))
        return np.array(result)

    ref_crops = crops(ref, range(n), image)
    fast_crops = crops(fast, range(n, 2 * n), str(path))
    reductions = [dct_scale(TorchvisionCropBox((0.2, 1.0))(640, 480), SIZE) for _ in range(50)]
    assert {2, 4} <= set(reductions)  # the reduced-size decode is exercised
    for column in (0, 1):
        assert ks_2samp(ref_crops[:, column], fast_crops[:, column]).pvalue > 0.01
    assert 0.2 <= ref_crops[:, 0].min() and fast_crops[:, 0].min() >= 0.19
    assert abs(fast_crops[:, 2].mean() - 0.5) < 0.1
    same_seeds = crops(fast, range(n), str(path))
    np.testing.assert_allclose(same_seeds[:, :2], ref_crops[:, :2], atol=0.02)
    assert (same_seeds[:, 2] == ref_crops[:, 2]).all()


@pytest.mark.parametrize("box", [(10, 20, 100, 90), (30, 17, 200, 150), (5, 3, 300, 280), (0, 0, 512, 512),
                                 (101, 77, 400, 300)])
def test_same_box_stays_within_interpolation_tolerance_of_todays_path(astronaut, box):
    """Reduced decode (1/2, 1/4, 1/8) + a float box vs full decode + bicubic: close, and much closer than the
    box moved by one reduced pixel, so the box maps exactly."""
    data = jpeg(astronaut)
    full = Image.open(io.BytesIO(data)).convert("RGB")

    def todays(top, left, h, w):  # what RandomResizedCrop does with the box: crop, then resize
        return as_tensor(full.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BICUBIC)).float()

    top, left, h, w = box
    a = dct_scale(box, SIZE)
    out = resized_crop(data, box, SIZE).float()
    error = (out - todays(*box)).abs().mean()
    shifted = todays(top + a, left + a, h - a, w - a) if a > 1 else todays(top, left + 1, h, w)
    assert error < (0.1 if a == 1 else 3.0)
    assert (out - shifted).abs().mean() > 2.5 * error + 1.0
    if a == 1:
        assert (out - todays(*box)).abs().max() <= 2


def test_png_and_flip_give_exactly_the_reference_pixels(astronaut, tmp_path):
    astronaut.save(tmp_path / "a.png")
    fast, ref = FastRandomResizedCrop(SIZE), reference()
    for seed in range(6):
        torch.manual_seed(seed)
        expected = as_tensor(ref(Image.open(tmp_path / "a.png").convert("RGB")))
        torch.manual_seed(seed)
        assert torch.equal(fast(str(tmp_path / "a.png")), expected)


def test_normalisation_on_the_device_equals_to_tensor_and_normalize():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(4)
    out, out_labels = NormalizeOnDevice(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)([images, labels],
                                                                                       torch.device("cpu"))
    normalize = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    expected = torch.stack([normalize(transforms.functional.to_tensor(im.permute(1, 2, 0).numpy()))
                            for im in images])
    assert out.dtype == torch.float32 and torch.equal(out_labels, labels)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_bad_jpeg_is_logged_counted_and_substituted(astronaut, tmp_path, kind, caplog):
    data = jpeg(astronaut)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\xff\xd8 not a jpeg", "empty": b""}[kind])
    good = tmp_path / "good.jpg"
    good.write_bytes(data)
    ds = RobustImageDataset([(str(bad), 1), (str(good), 0)], max_bad_fraction=1.0, loader=FastRandomResizedCrop(SIZE))
    with caplog.at_level(logging.WARNING, logger="maskalign.data"):
        image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == 0
    assert (ds.num_bad, ds.num_attempted) == (1, 2) and str(bad) in caplog.text


def test_per_sample_seeding_queues_no_cuda_calls():
    """Seeding each sample must not go through torch.manual_seed, which in a process without CUDA (every
    DataLoader worker) queues a lazy CUDA call with a formatted stack each time: slow, and the queue grows."""
    from util.sampler import PerSampleSeeded

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(1)

    queued = len(torch.cuda._queued_calls)
    dataset = PerSampleSeeded(Draws(), seed=0)
    first = [dataset[i] for i in range(4)]
    assert len(torch.cuda._queued_calls) == queued
    assert all(torch.equal(a, b) for a, b in zip(first, [dataset[i] for i in range(4)]))


def test_workers_draw_the_crops_the_main_process_draws(astronaut, tmp_path):
    """Workers seed without saving and restoring the RNG states; the crops stay those of (seed, epoch, index)."""
    from torch.utils.data import DataLoader

    from util.sampler import PerSampleSeeded, ResumableDistributedSampler
    samples = [(jpeg(astronaut.rotate(10 * k), tmp_path / f"{k}.jpg") and str(tmp_path / f"{k}.jpg"), k)
               for k in range(6)]
    dataset = PerSampleSeeded(RobustImageDataset(samples, loader=FastRandomResizedCrop(SIZE)), seed=3)
    sampler = ResumableDistributedSampler(len(dataset), seed=3, tag_epoch=True)
    sampler.set_epoch(2)
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=2, multiprocessing_context="fork")
    from_workers = torch.cat([images for images, _ in loader])
    in_process = torch.stack([dataset[tagged][0] for tagged in sampler])
    assert torch.equal(from_workers, in_process)


@pytest.mark.parametrize("linprobe_crop", [None, "mae", "torchvision"])
def test_pil_and_fast_backends_crop_the_same_box(astronaut, tmp_path, linprobe_crop):
    """Pre-training's crop and both linear-probe crops: on PNG files (PIL's exact path in both backends) the
    fast backend's uint8 output, normalised, is the pil backend's output."""
    (tmp_path / "train" / "c").mkdir(parents=True)
    for k in range(3):
        astronaut.rotate(20 * k).resize((300, 200)).save(tmp_path / "train" / "c" / f"{k}.png")
    outputs = {}
    for backend in ("pil", "fast"):
        data = build_train_data(backend, str(tmp_path), SIZE, linprobe_crop=linprobe_crop)
        outputs[backend] = []
        for k in range(3):
            torch.manual_seed(k)
            outputs[backend].append(data.dataset[k][0])
    for pil_out, fast_out in zip(outputs["pil"], outputs["fast"]):
        assert fast_out.dtype == torch.uint8
        torch.testing.assert_close(normalize_pixels(fast_out[None], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0],
                                   pil_out, rtol=0, atol=1e-5)
