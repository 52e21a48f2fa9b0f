"""The gpu backend's parts that run on CPU tensors (util/gpu_decode.py): crop geometry, batched roi_align crops
against the reference resize, substitution of undecodable images, uint8 -> normalised output (issue #9)."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

import engine
from benchmarks.photos import shipped_photos
from util.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    TooManyBadSamplesError,
    build_train_data,
)
from util.fast_crop import FastRandomResizedCrop, normalize_pixels
from util.gpu_decode import EncodedCrop, crop_boxes
from util.sampler import PerSampleSeeded

SIZE = 64
CPU = torch.device("cpu")


def photo(index=0, size=None) -> Image.Image:
    image = Image.open(shipped_photos()[index]).convert("RGB")
    return image.resize(size, Image.BICUBIC) if size else image


def save_jpeg(image, path):
    image.save(path, quality=90)
    return str(path)


def test_workers_draw_the_fast_paths_crop_box(tmp_path):
    """Same seed, same box and flip as the CPU paths (so exact resume and the crop distribution carry over)."""
    path = save_jpeg(photo(0, (300, 200)), tmp_path / "a.jpg")
    for seed in range(20):
        torch.manual_seed(seed)
        data, box, flip, name = EncodedCrop(SIZE)(path)
        torch.manual_seed(seed)
        top, left, h, w = transforms.RandomResizedCrop.get_params(torch.empty(3, 200, 300), [0.2, 1.0], [3 / 4, 4 / 3])
        assert box.tolist() == [left, top, left + w, top + h]
        assert flip == bool(torch.rand(1) < 0.5) and name == path
        assert bytes(data.numpy()) == open(path, "rb").read()


def test_roi_align_crops_match_the_reference_resize():
    """Batched crops of images of two sizes vs PIL's bicubic resize of the same boxes, on CPU tensors:
    within interpolation tolerance (roi_align averages bilinear samples; it is not bicubic)."""
    images = [photo(0, (500, 375)), photo(4, (375, 500)), photo(10, (500, 375))]
    tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
    boxes = torch.tensor([[20., 30., 320., 330.], [0., 0., 375., 500.], [100., 50., 140., 95.]])
    out = crop_boxes(tensors, boxes, SIZE)
    assert out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.float32
    for k, (image, box) in enumerate(zip(images, boxes.tolist())):
        expected = torch.from_numpy(np.asarray(image.crop(box).resize((SIZE, SIZE), Image.BICUBIC)).copy())
        error = (out[k] - expected.permute(2, 0, 1).float()).abs()
        assert error.mean() < 2.5, (k, error.mean())
        assert torch.equal(crop_boxes([tensors[k]], boxes[k:k + 1], SIZE)[0], out[k])  # batching changes nothing


def encoded_batch(tmp_path, kinds, labels=None):
    """A gpu-backend batch of `kinds` ('jpeg', 'png', 'bad', 'cut') files through the real dataset and collation."""
    paths = []
    for k, kind in enumerate(kinds):
        image = photo(k % 3, (120, 90))
        if kind == "png":
            paths.append(str(tmp_path / f"{k}.png"))
            image.save(paths[-1])
        else:
            paths.append(save_jpeg(image, tmp_path / f"{k}.jpg"))
            data = open(paths[-1], "rb").read()
            if kind == "bad":  # header and end marker intact, no image data: only the decode can tell
                open(paths[-1], "wb").write(data[:data.index(b"\xff\xda")] + bytes(range(256)) + b"\xff\xd9")
            if kind == "cut":
                open(paths[-1], "wb").write(data[:len(data) // 3])
    folder = tmp_path / "list.txt"
    folder.write_text("".join(f"{p} {y}\n" for p, y in zip(paths, labels or range(len(paths)))))
    data = build_train_data("gpu", "/", SIZE, file_list=str(folder), max_bad_fraction=1.0)
    loader = DataLoader(PerSampleSeeded(data.dataset, 0), batch_size=len(kinds), collate_fn=data.collate_fn)
    return data, next(iter(loader))


def test_device_decode_substitutes_undecodable_images_and_decodes_png_on_cpu(tmp_path, caplog):
    data, batch = encoded_batch(tmp_path, ["jpeg", "bad", "png", "jpeg", "bad"])
    assert data.dataset.num_bad == 0  # headers parse: the workers cannot tell
    with caplog.at_level(logging.WARNING, logger="maskalign.data"):
        images, labels = data.batch_to_device(batch, CPU)
    assert images.shape == (5, 3, SIZE, SIZE) and images.dtype == torch.float32
    # bad 1 -> next good (2, the PNG); bad 4 -> first good (0), with their labels
    assert labels.tolist() == [0, 2, 2, 3, 0]
    assert torch.equal(images[1], images[2]) and torch.equal(images[4], images[0])
    assert (data.dataset.num_bad, data.dataset.num_attempted) == (2, 5)
    assert "1.jpg" in caplog.text and "4.jpg" in caplog.text
    # the good crops are the fast path's crops, up to the interpolation kernel
    torch.manual_seed(hash((0, 0, 0)) % (2 ** 31))
    fast = FastRandomResizedCrop(SIZE)(batch[4][0])
    expected = normalize_pixels(fast[None], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0]
    assert (images[0] - expected).abs().mean() < 0.1  # ~4 grey levels in normalised units


def test_a_batch_with_nothing_decodable_is_a_data_failure(tmp_path):
    """It must reach the loop's vote (TooManyBadSamplesError), not leave the other ranks waiting."""
    data, batch = encoded_batch(tmp_path, ["bad", "bad"])
    with pytest.raises(TooManyBadSamplesError, match="no image of a batch of 2"):
        data.batch_to_device(batch, CPU)


def test_truncated_jpeg_is_caught_in_the_worker(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="maskalign.data"):
        data, batch = encoded_batch(tmp_path, ["cut", "jpeg"])
    assert (data.dataset.num_bad, data.dataset.num_attempted) == (1, 3)  # sample 0 was substituted by a load
    assert "0.jpg" in caplog.text and "end-of-image" in caplog.text
    images, labels = data.batch_to_device(batch, CPU)
    assert images.shape == (2, 3, SIZE, SIZE) and data.dataset.num_bad == 1


def test_device_decode_applies_max_bad_fraction(tmp_path):
    data, batch = encoded_batch(tmp_path, ["jpeg"] * 10 + ["bad"] * 2)
    data.dataset.max_bad_fraction = 0.1
    with pytest.raises(TooManyBadSamplesError, match="max_bad_fraction"):
        data.batch_to_device(batch, CPU)


def test_engine_passes_batches_through_the_device_hook_one_ahead():
    seen = []

    def hook(batch, device):
        seen.append(batch)
        return [batch * 10]

    batches = engine._on_device(iter([1, 2, 3]), hook, CPU)
    assert next(batches) == [10] and seen == [1, 2]  # the next batch is already on its way
    assert list(batches) == [[20], [30]]
