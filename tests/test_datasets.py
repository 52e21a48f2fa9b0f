"""Tests for util/data.py on tiny synthetic images (whole file: a few seconds)."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from util.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RobustImageDataset,
    TooManyBadSamplesError,
    build_dataset,
    build_finetune_transform,
    build_pretrain_transform,
)

N_PER_CLASS = 6
to_tensor = transforms.ToTensor()  # deterministic, so equal outputs mean the same file


def _save_image(path, value, ext="png", size=(40, 40)):
    """Uniform image of grey level ``value`` (distinct per file, so outputs identify files)."""
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(f"{path}.{ext}")
    return f"{path}.{ext}"


def _cut_in_half(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _make_bad_files(directory):
    """One file per failure kind; all carry image extensions so listing keeps them."""
    zero = os.path.join(directory, "bad_zero.jpg")
    open(zero, "wb").close()
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    truncated = os.path.join(directory, "bad_truncated.jpg")
    Image.fromarray(noise).save(truncated, quality=95)
    _cut_in_half(truncated)
    truncated_png = os.path.join(directory, "bad_truncated.png")
    Image.fromarray(noise).save(truncated_png)
    _cut_in_half(truncated_png)
    text = os.path.join(directory, "bad_text.png")
    with open(text, "w") as f:
        f.write("this is not an image\n")
    return {"zero": zero, "truncated": truncated, "truncated_png": truncated_png, "text": text}


@pytest.fixture
def image_root(tmp_path):
    """root/dark/* (label 0) and root/bright/* (label 1), PNG and JPEG mixed."""
    root = tmp_path / "data"
    for name, base in (("a_dark", 10), ("b_bright", 200)):
        (root / name).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            _save_image(str(root / name / f"img{i}"), base + 5 * i, ext="png" if i % 2 else "jpg")
    return root


@pytest.fixture
def root_with_bad(image_root):
    _make_bad_files(str(image_root / "a_dark"))
    return image_root


def _write_list(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_image_folder_and_file_list_agree(image_root, tmp_path):
    folder = build_dataset(str(image_root), to_tensor)
    assert folder.classes == ["a_dark", "b_bright"]
    assert len(folder) == 2 * N_PER_CLASS and folder.targets == [0] * N_PER_CLASS + [1] * N_PER_CLASS
    lines = ["# relative/path label", ""] + [f"{os.path.relpath(p, image_root)} {y}" for p, y in folder.samples]
    listed = build_dataset(str(image_root), to_tensor, file_list=_write_list(tmp_path / "train.txt", lines))
    assert [(os.path.normpath(p), y) for p, y in listed.samples] == folder.samples
    assert listed.targets == folder.targets and listed.classes == [0, 1]
    img, label = folder[0]
    assert label == 0 and img.max() < 0.3  # class 0 is dark
    assert folder[len(folder) - 1][0].min() > 0.7  # class 1 is bright


def test_split_subdirectory(image_root, tmp_path):
    # No data_path/train: train on data_path itself; but no data_path/val is never "evaluate on the training
    # images" (issue 11, item 6).
    assert build_dataset(str(image_root), None, split="train").classes == ["a_dark", "b_bright"]
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset(str(image_root), None, split="val")
    (tmp_path / "imagenet").mkdir()
    os.rename(image_root, tmp_path / "imagenet" / "train")
    ds = build_dataset(str(tmp_path / "imagenet"), None, split="train")
    assert ds.classes == ["a_dark", "b_bright"] and len(ds) == 2 * N_PER_CLASS


def test_listing_does_not_open_images(image_root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("listing must not open images")
    monkeypatch.setattr(Image, "open", fail)
    assert len(build_dataset(str(image_root), None)) == 2 * N_PER_CLASS


def test_file_list_path_with_spaces(tmp_path):
    (tmp_path / "dir with space").mkdir()
    _save_image(str(tmp_path / "dir with space" / "my img"), 50)
    ds = build_dataset(str(tmp_path), to_tensor,
                       file_list=_write_list(tmp_path / "l.txt", ["  dir with space/my img.png\t3  "]))
    assert ds.samples == [(str(tmp_path / "dir with space" / "my img.png"), 3)]
    assert ds[0][1] == 3 and ds.num_bad == 0


@pytest.mark.parametrize("bad_line", ["just_a_path.png", "img.png label", "img.png -1"])
def test_malformed_file_list_line_names_line_number(tmp_path, bad_line):
    file_list = _write_list(tmp_path / "l.txt", ["# header", "a.png 0", bad_line])
    with pytest.raises(ValueError, match=r"l\.txt, line 3"):
        build_dataset(str(tmp_path), None, file_list=file_list)


def test_clear_errors_for_missing_or_empty_data(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(missing, None)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(missing, None, file_list=_write_list(tmp_path / "l.txt", ["a.png 0"]))
    with pytest.raises(ValueError, match="No class sub-directories"):
        build_dataset(str(tmp_path), None)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="No images"):
        build_dataset(str(tmp_path), None)
    with pytest.raises(ValueError, match="no samples"):
        build_dataset(str(tmp_path), None, file_list=_write_list(tmp_path / "e.txt", ["# only a comment"]))


@pytest.mark.parametrize("kind", ["zero", "truncated", "truncated_png", "text", "missing", "decompression_bomb"])
def test_bad_file_is_logged_and_substituted(tmp_path, kind, caplog, monkeypatch):
    bad = _make_bad_files(str(tmp_path)).get(kind, str(tmp_path / "gone.jpg"))
    if kind == "decompression_bomb":
        bad = _save_image(str(tmp_path / "huge"), 0)
    good = _save_image(str(tmp_path / "good"), 123, size=(8, 8))
    if kind == "decompression_bomb":  # 40x40 > 2 * limit raises, 8x8 only warns
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)
    ds = RobustImageDataset([(bad, 1), (good, 0)], to_tensor, max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="maskalign.data"):
        img, label = ds[0]
    assert label == 0 and img.shape == (3, 8, 8) and torch.allclose(img, torch.full_like(img, 123 / 255))
    assert (ds.num_bad, ds.num_attempted) == (1, 2)
    assert bad in caplog.text and caplog.records[0].name == "maskalign.data"


def test_substitution_is_deterministic(root_with_bad):
    ds = build_dataset(str(root_with_bad), to_tensor, max_bad_fraction=1.0)
    bad_idx = [i for i, (p, _) in enumerate(ds.samples) if "bad_" in p]
    assert len(bad_idx) == 4
    fresh = build_dataset(str(root_with_bad), to_tensor, max_bad_fraction=1.0)
    for i in bad_idx:
        first, label = ds[i]
        again, label_again = ds[i]
        other, label_other = fresh[i]
        assert label == label_again == label_other
        assert torch.equal(first, again) and torch.equal(first, other)
    assert ds.num_bad >= 8 and fresh.num_bad >= 4


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_counts_from_workers_visible_in_main_process(root_with_bad, context):
    # max_bad_fraction=1.0: with 4 of 16 files bad, whether the threshold fires
    # would depend on worker timing; the threshold has its own tests.
    reference = build_dataset(str(root_with_bad), to_tensor, max_bad_fraction=1.0)
    for i in range(len(reference)):
        reference[i]
    assert reference.num_bad >= 4 and reference.num_attempted == len(reference) + reference.num_bad

    ds = build_dataset(str(root_with_bad), to_tensor, max_bad_fraction=1.0)
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    n_images = 0
    for images, labels in loader:
        assert images.shape[1:] == (3, 40, 40) and torch.isfinite(images).all()
        n_images += len(images)
    assert n_images == len(ds)
    assert (ds.num_bad, ds.num_attempted) == (reference.num_bad, reference.num_attempted)


def test_mostly_bad_dataset_fails_early(tmp_path):
    good = [(_save_image(str(tmp_path / f"g{i}"), 9), 0) for i in range(2)]
    bad = [(str(tmp_path / f"missing{i}.jpg"), 1) for i in range(8)]
    ds = RobustImageDataset(good + bad, to_tensor, max_bad_fraction=0.01)
    with pytest.raises(TooManyBadSamplesError, match="--max_bad_fraction") as excinfo:
        for i in range(len(ds)):
            ds[i]
    assert "missing" in str(excinfo.value) and "of" in str(excinfo.value)
    # Raised inside a DataLoader worker, it reaches the main process with its type.
    batches = iter(DataLoader(RobustImageDataset(good + bad, to_tensor), batch_size=len(ds), num_workers=2,
                              multiprocessing_context="fork"))
    with pytest.raises(TooManyBadSamplesError, match="missing"):
        next(batches)
    # Exhaust the iterator: workers of an abandoned one take 5 s each to be killed.
    with pytest.raises(StopIteration):
        next(batches)


@pytest.mark.parametrize("bad_position", [0, -1])
def test_few_bad_files_do_not_fire_threshold(tmp_path, bad_position):
    samples = [(_save_image(str(tmp_path / f"g{i}"), i), 0) for i in range(12)]
    samples.insert(bad_position if bad_position == 0 else len(samples), (str(tmp_path / "gone.jpg"), 1))
    ds = RobustImageDataset(samples, to_tensor, max_bad_fraction=0.1)
    for i in range(len(ds)):
        assert ds[i][1] == 0
    assert (ds.num_bad, ds.num_attempted) == (1, len(ds) + 1)


def test_all_bad_gives_up_after_consecutive_failures(tmp_path):
    ds = RobustImageDataset([(str(tmp_path / "gone.jpg"), 0)], to_tensor, max_bad_fraction=1.0)
    with pytest.raises(RuntimeError, match="consecutive.*gone.jpg"):
        ds[0]


def test_transform_errors_are_not_swallowed(tmp_path):
    def broken(img):
        raise ValueError("bug in transform")
    ds = RobustImageDataset([(_save_image(str(tmp_path / "g"), 1), 0)], broken)
    with pytest.raises(ValueError, match="bug in transform"):
        ds[0]
    assert ds.num_bad == 0


def test_pretrain_transform():
    out = build_pretrain_transform(32)(Image.new("RGB", (40, 50), (0, 0, 0)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = -torch.tensor(IMAGENET_DEFAULT_MEAN) / torch.tensor(IMAGENET_DEFAULT_STD)
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-5)


def test_finetune_transforms():
    img = Image.new("RGB", (60, 45), (128, 64, 32))
    evaluation = build_finetune_transform(False, 32)
    resize = evaluation.transforms[0]
    assert resize.size == 36 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    out = evaluation(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    train = build_finetune_transform(True, 32, None, "rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    out = train(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, mode):
    """Pillow's own I;16 -> RGB clips every value above 255: a 16-bit photograph came out almost white
    (issue 11, item 9). A ramp over the 16-bit range must keep its shape, scaled to 8 bits."""
    ramp = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)
    img = Image.fromarray(ramp)  # I;16
    path = str(tmp_path / ("ramp.png" if mode == "I;16" else "ramp.tif"))
    (img if mode == "I;16" else img.convert("I")).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    ds = RobustImageDataset([(path, 0)], None)
    rgb = np.asarray(ds[0][0])
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all() and 126 <= rgb.mean() <= 129  # grey, mid-range, not white
