"""Datasets and transforms for pre-training and fine-tuning: ImageFolder, file lists and tar shards, MAE's
transforms, and the `--data_backend` choice (`build_train_data`: pil, fast or gpu). `RobustImageDataset`
logs an unreadable image, substitutes another sample deterministically (a resumed run sees the same data) and
fails only when `--max_bad_fraction` shows the dataset itself is broken.
"""
import functools
import io
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from util.bad_images import TooManyBadSamplesError
from util.fast_crop import FastRandomResizedCrop, NormalizeOnDevice, TorchvisionCropBox, to_rgb
from util.gpu_decode import DecodeOnDevice, EncodedCrop, collate_encoded
from util.shards import ShardMember, index_shards, is_shard_spec, missing_shards, read_bytes, shard_paths

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "TooManyBadSamplesError", "RobustImageDataset",
    "build_pretrain_transform", "build_finetune_transform", "build_linprobe_transform", "eval_resize_size",
    "TFRandomResizedCrop", "build_dataset", "check_data_root", "count_classes", "DATA_BACKENDS", "TrainData",
    "build_train_data",
]

logger = logging.getLogger("maskalign.data")

Source = Union[str, ShardMember]  # a file path or an image inside a tar shard
Sample = tuple[Source, int]
DATA_BACKENDS = ("pil", "fast", "gpu")

# Prime stride for substitutes: consecutive files are often bad together
# (one broken shard/directory), so jump far away instead of taking i + 1.
_SUBSTITUTE_STRIDE = 7919
_MAX_CONSECUTIVE_FAILURES = 50
# The bad-fraction check waits for this many attempts (or one pass over a
# smaller dataset) so a couple of bad files among the first reads are tolerated.
_MIN_ATTEMPTS_FOR_CHECK = 100


def build_pretrain_transform(input_size: int, scale: tuple[float, float] = (0.2, 1.0)) -> transforms.Compose:
    """MAE pre-training augmentation: only crop + flip, masking does the rest."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=scale,
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


class TFRandomResizedCrop(torch.nn.Module):
    """The random resized crop of TF/TPU pipelines (BYOL, MAE's linear probe): a single draw, no retries.

    Area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the width and height that follow are each
    clamped to the image, so a large draw gives a crop spanning a full side instead of being redrawn.
    torchvision's crop retries up to 10 times and then falls back to a centre crop, which skews it towards
    smaller crops: on a 500x375 image the mean crop covers 43.5% of the image against 51.8% here, and 0.6%
    of its crops span a full side against 25.6% (tests/test_finetune.py measures both).
    Randomness comes from torch's global generator, like torchvision's transforms.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BICUBIC):
        super().__init__()
        self.size, self.scale, self.interpolation = (size, size), scale, interpolation
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) for an image of the given size."""
        area = width * height * _uniform(*self.scale)
        aspect = math.exp(_uniform(*self.log_ratio))
        crop_w = min(width, int(round(math.sqrt(area * aspect))))
        crop_h = min(height, int(round(math.sqrt(area / aspect))))
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return top, left, crop_h, crop_w

    def forward(self, img):
        width, height = transforms.functional.get_image_size(img)
        return transforms.functional.resized_crop(img, *self.crop_box(width, height), list(self.size),
                                                  self.interpolation, antialias=True)


def _uniform(low: float, high: float) -> float:
    return torch.empty(()).uniform_(low, high).item()


def build_linprobe_transform(input_size: int, crop: str = "mae") -> transforms.Compose:
    """MAE's linear-probe augmentation: random resized crop (scale 0.08-1, bicubic) + flip, nothing else.
    ``crop='mae'`` is MAE's single-draw TF-style crop; ``'torchvision'`` is torchvision's retrying one."""
    if crop == "mae":
        random_crop = TFRandomResizedCrop(input_size)
    elif crop == "torchvision":
        random_crop = transforms.RandomResizedCrop(input_size, interpolation=transforms.InterpolationMode.BICUBIC)
    else:
        raise ValueError(f"crop must be 'mae' or 'torchvision', got {crop!r}")
    return transforms.Compose([
        random_crop,
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def eval_resize_size(input_size: int) -> int:
    """MAE's evaluation resize: crop_pct 0.875 up to 224 px (224 -> 256), 1.0 above (384 -> 384)."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)


def build_finetune_transform(is_train: bool, input_size: int, color_jitter: Optional[float] = None,
                             aa: Optional[str] = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                             remode: str = "pixel", recount: int = 1,
                             interpolation: str = "bicubic") -> Callable:
    """MAE fine-tuning transforms.

    Train: timm's RandomResizedCrop + RandAugment + random erasing pipeline.
    Eval: resize the shorter side to ``eval_resize_size(input_size)`` and centre-crop, as MAE does.
    ``interpolation`` must be a torchvision mode name for eval (not timm's 'random').
    """
    if is_train:
        return create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                                auto_augment=aa, interpolation=interpolation, re_prob=reprob,
                                re_mode=remode, re_count=recount,
                                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return transforms.Compose([
        transforms.Resize(eval_resize_size(input_size), interpolation=transforms.InterpolationMode(interpolation)),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def load_rgb(source: Source) -> Image.Image:
    """Read and fully decode an image; PIL is lazy, so ``convert`` forces the
    decode here, where failures are caught, instead of inside the transform."""
    return to_rgb(Image.open(io.BytesIO(read_bytes(source))))


class RobustImageDataset(torch.utils.data.Dataset):
    """(source, label) samples whose unreadable images are skipped, not fatal.

    ``loader(source)`` reads and decodes a sample (by default to an RGB PIL image, then ``transform``
    applies); any exception it raises marks the file bad. A failed load is logged (logger
    ``maskalign.data``) and replaced by sample ``(i + k * 7919) % len`` for k = 1, 2, ... Failures and
    attempts are counted in shared memory, so counts from DataLoader workers are visible in the main
    process and the bad-fraction limit applies to the whole run.
    """

    def __init__(self, samples: Sequence[Sample], transform: Optional[Callable] = None,
                 classes: Optional[list] = None, max_bad_fraction: float = 0.01,
                 loader: Callable[[Source], Any] = load_rgb):
        if not samples:
            raise ValueError("RobustImageDataset needs at least one sample")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.samples: list[Sample] = list(samples)
        self.targets: list[int] = [label for _, label in self.samples]
        self.classes: list = classes if classes is not None else sorted(set(self.targets))
        self.transform, self.loader = transform, loader
        self.max_bad_fraction = max_bad_fraction
        # Shared-memory counters guarded by one lock, so both change together.
        # A lock from the default (fork) context refuses to be pickled for spawn
        # workers; a spawn-context lock works with fork, spawn and forkserver.
        self._lock = multiprocessing.get_context("spawn").Lock()
        self._num_bad = multiprocessing.Value("q", 0, lock=False)
        self._num_attempted = multiprocessing.Value("q", 0, lock=False)

    @property
    def num_bad(self) -> int:
        """Failed image loads so far, summed over all worker processes."""
        return self._num_bad.value

    @property
    def num_attempted(self) -> int:
        """Image loads attempted so far (substitutes included), over all workers."""
        return self._num_attempted.value

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, target = self._load_with_substitutes(index)
        # Outside the guard on purpose: a transform failing on a valid image is a bug.
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def _load_with_substitutes(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        stride = _SUBSTITUTE_STRIDE if math.gcd(_SUBSTITUTE_STRIDE, n) == 1 else 1
        for k in range(_MAX_CONSECUTIVE_FAILURES):
            path, target = self.samples[(index + k * stride) % n]
            try:
                # Decoders raise many types on corrupt data (OSError, SyntaxError,
                # ValueError, struct.error, DecompressionBombError, ...); the block
                # only reads this one file, so any failure means the file is bad.
                img = self.loader(path)
            except Exception as e:
                self.record_bad(path, e)
                continue
            with self._lock:
                self._num_attempted.value += 1
            return img, target
        # TooManyBadSamplesError: the training loop stops every rank on it with one line and exit code 1
        raise TooManyBadSamplesError(f"{_MAX_CONSECUTIVE_FAILURES} consecutive images failed to load starting at "
                                     f"index {index} (last: {path}); is the data directory readable?")

    def record_bad(self, path: Source, error: Exception, count_attempt: bool = True) -> None:
        """Log and count a bad image; raise if the run's share of bad images is now too high.
        ``count_attempt=False`` for an image whose load was already counted (the GPU decodes it later)."""
        reason = f"{type(error).__name__}: {error}"
        logger.warning("Bad image %s (%s); substituting another sample", path, reason)
        with self._lock:
            self._num_attempted.value += int(count_attempt)
            self._num_bad.value += 1
            bad, attempted = self._num_bad.value, self._num_attempted.value
        if attempted >= min(len(self), _MIN_ATTEMPTS_FOR_CHECK) and bad > self.max_bad_fraction * attempted:
            raise TooManyBadSamplesError(
                f"{bad} of {attempted} attempted images were unreadable ({bad / attempted:.1%}), more than "
                f"the allowed {self.max_bad_fraction:.1%} (--max_bad_fraction). Last bad file: {path} "
                f"({reason})")


def _find_images(class_dir: str) -> list[str]:
    """Image paths under ``class_dir`` (recursive, sorted), chosen by extension
    only: opening 1.28M files just to list them would take hours."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return paths


def scan_image_folder(root: str) -> tuple[list[Sample], list[str]]:
    """ImageFolder layout ``root/<class>/<image>``; label = index of the sorted class name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image directory not found: {root}")
    classes = _class_dirs(root)
    if not classes:
        raise ValueError(f"No class sub-directories in {root} (expected root/<class>/<image>)")
    samples = [(path, label) for label, name in enumerate(classes)
               for path in _find_images(os.path.join(root, name))]
    if not samples:
        raise ValueError(f"No images with extensions {IMG_EXTENSIONS} found under {root}")
    return samples, classes


def read_file_list(file_list: str, root: str) -> list[Sample]:
    """Lines ``relative/path label``; split on the last whitespace so paths may
    contain spaces. Blank lines and ``#`` comments are skipped. Files are not
    checked here: missing ones are handled as bad samples when loaded."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Data directory not found: {root}")
    samples = []
    with open(file_list, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f'{file_list}, line {line_no}: expected "<relative path> <integer label>", '
                                 f'got {line!r}')
            samples.append((os.path.join(root, parts[0]), int(parts[1])))
    if not samples:
        raise ValueError(f"File list {file_list} contains no samples")
    return samples


def split_root(data_path: str, split: Optional[str]) -> str:
    """``data_path/split`` if that folder exists (MAE's ``--data_path /imagenet`` + ``train/``), else
    ``data_path``, but only for the training split: evaluating on the training images, as if they were a
    validation set, would report a meaningless accuracy without any sign of it."""
    if split is None:
        return data_path
    root = os.path.join(data_path, split)
    if os.path.isdir(root) or split != "train":
        return root
    return data_path


def build_dataset(data_path: str, transform: Optional[Callable], split: Optional[str] = None,
                  file_list: Optional[str] = None, max_bad_fraction: float = 0.01,
                  loader: Callable[[Source], Any] = load_rgb) -> RobustImageDataset:
    """Dataset from a file list (paths relative to ``data_path``), else from tar shards if ``data_path``
    names them (util/shards.py), else from the ImageFolder at :func:`split_root` (``data_path/train`` or
    ``data_path`` for training; ``data_path/<split>`` otherwise)."""
    kwargs = dict(max_bad_fraction=max_bad_fraction, loader=loader)
    if file_list is not None:
        return RobustImageDataset(read_file_list(file_list, data_path), transform, **kwargs)
    if is_shard_spec(data_path, split):
        samples = index_shards(shard_paths(data_path, split))
        return RobustImageDataset(samples, transform, **kwargs)
    samples, classes = scan_image_folder(split_root(data_path, split))
    return RobustImageDataset(samples, transform, classes=classes, **kwargs)


def _class_dirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def check_data_root(data_path: str, split: Optional[str] = "train", file_list: Optional[str] = None) -> None:
    """Cheap start-up check (no image is opened, the listing stops at the first image found): raises
    ValueError naming what is wrong with ``data_path``."""
    if not data_path:
        raise ValueError("--data_path is empty; give the folder that holds the images (or train/ and val/)")
    if is_shard_spec(data_path, split):
        missing = missing_shards(data_path) if not os.path.isdir(data_path) else []
        if missing:
            raise ValueError(f"--data_path {data_path}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
        shard_paths(data_path, split)  # a folder whose split sub-folder has no .tar files fails here
        return
    if not os.path.isdir(data_path):
        problem = "is a file, not a directory" if os.path.exists(data_path) else "does not exist"
        raise ValueError(f"--data_path {data_path} {problem}; it must be a directory of images")
    if file_list is not None:
        return
    root = split_root(data_path, split)
    if not os.path.isdir(root):
        raise ValueError(f"{root} does not exist")
    classes = _class_dirs(root)
    if not classes:
        raise ValueError(f"{root} has no class sub-directories (expected {root}/<class>/<image>)")
    if not any(_has_image(os.path.join(root, name)) for name in classes):
        raise ValueError(f'{root} has no images with extensions {", ".join(IMG_EXTENSIONS)}')


def _has_image(class_dir: str) -> bool:
    for _, _, filenames in os.walk(class_dir, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in filenames):
            return True
    return False


def count_classes(data_path: str, split: str, file_list: Optional[str] = None) -> tuple[int, Optional[list[str]]]:
    """(number of classes, class names) of a split without opening images: the sorted class folders of an
    ImageFolder, or the largest label + 1 of a file list or of tar shards (names None)."""
    if file_list is not None:
        return max(label for _, label in read_file_list(file_list, data_path)) + 1, None
    if is_shard_spec(data_path, split):
        return max(label for _, label in index_shards(shard_paths(data_path, split))) + 1, None
    classes = _class_dirs(split_root(data_path, split))
    return len(classes), classes


@dataclass
class TrainData:
    """A training set and what its backend needs around the DataLoader (engine.Task takes both hooks)."""
    dataset: RobustImageDataset
    collate_fn: Optional[Callable] = None  # None: torch's default
    batch_to_device: Optional[Callable[[Any, torch.device], list]] = None  # None: every tensor .to(device)


def build_train_data(backend: str, data_path: str, input_size: int, scale: tuple[float, float] = (0.2, 1.0),
                     file_list: Optional[str] = None, max_bad_fraction: float = 0.01,
                     linprobe_crop: Optional[str] = None) -> TrainData:
    """The crop + flip training set through ``backend``: pre-training's crop (torchvision's RandomResizedCrop
    with ``scale``), or with ``linprobe_crop`` ('mae' or 'torchvision') linear probing's (`build_linprobe_transform`).

    pil  -- MAE's transform: PIL decode, random resized crop (bicubic), flip, ToTensor, Normalize in the worker;
    fast -- the same crops on uint8 with reduced-size JPEG decoding; normalised on the device;
    gpu  -- workers read bytes and draw the crops; nvJPEG decodes and roi_align crops on the GPU.
    """
    build = functools.partial(build_dataset, data_path, split="train", file_list=file_list,
                              max_bad_fraction=max_bad_fraction)
    if backend == "pil":
        transform = build_linprobe_transform(input_size, linprobe_crop) if linprobe_crop \
            else build_pretrain_transform(input_size, scale)
        return TrainData(build(transform=transform))
    # the same draws as the pil transform's crop, so every backend crops the same box for the same seed
    crop_box = TFRandomResizedCrop(input_size).crop_box if linprobe_crop == "mae" \
        else TorchvisionCropBox((0.08, 1.0) if linprobe_crop else scale)
    if backend == "fast":
        return TrainData(build(transform=None, loader=FastRandomResizedCrop(input_size, crop_box=crop_box)),
                         batch_to_device=NormalizeOnDevice(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    if backend == "gpu":
        dataset = build(transform=None, loader=EncodedCrop(input_size, crop_box=crop_box))
        return TrainData(dataset, collate_fn=collate_encoded,
                         batch_to_device=DecodeOnDevice(input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                                        dataset))
    raise ValueError(f"unknown data backend {backend!r}; choose one of {DATA_BACKENDS}")
