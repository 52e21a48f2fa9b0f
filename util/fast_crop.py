"""The `fast` data backend: MAE's pre-training crop (RandomResizedCrop, bicubic, + flip) on uint8, 2-3x the
images/s per core of the PIL path. The box and flip are drawn with torchvision's own calls on the same RNG,
so per-sample seeded crops equal the PIL path's box for box; large crops decode the JPEG at reduced size.
Workers return uint8 and `NormalizeOnDevice` normalises on the GPU. docs/data.md has the measured accuracy.
"""
import io
import math
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from util.shards import read_bytes

CropBox = tuple[int, int, int, int]  # top, left, height, width (torchvision's order)
# 16-bit grey PNGs open as I;16 (or I on older Pillow); also the 32-bit I mode, read as 16-bit samples.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
DCT_SCALES = (8, 4, 2)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own I;16 -> RGB conversion clips every value above 255, which turns a 16-bit
    photograph almost white; keep the high byte instead (0..65535 -> 0..255)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        high_byte = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        img = Image.fromarray(high_byte.astype(np.uint8))
    return img.convert("RGB")


class TorchvisionCropBox:
    """torchvision's RandomResizedCrop box: (width, height) -> (top, left, h, w), drawn by its own get_params."""

    def __init__(self, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.scale, self.ratio = list(scale), list(ratio)

    def __call__(self, width: int, height: int) -> CropBox:
        size_only = torch.empty(()).expand(1, height, width)  # all get_params reads of an image is its shape
        return tuple(transforms.RandomResizedCrop.get_params(size_only, self.scale, self.ratio))


CropSampler = Callable[[int, int], CropBox]  # (width, height) -> box; e.g. TFRandomResizedCrop(...).crop_box


def draw_crop(image_size: tuple[int, int], crop_box: CropSampler) -> tuple[CropBox, bool]:
    """(crop box, flip) for an image of ``image_size`` (width, height), drawn in the PIL path's order: the
    crop transform's draws, then RandomHorizontalFlip's."""
    box = tuple(crop_box(*image_size))
    flip = bool(torch.rand(1) < 0.5)
    return box, flip


def dct_scale(box: CropBox, size: int) -> int:
    """Largest libjpeg reduction (8, 4, 2, else 1) that keeps both crop sides >= the output size, so the
    remaining resize is still a downscale."""
    _, _, h, w = box
    return next((a for a in DCT_SCALES if min(h, w) >= a * size), 1)


def resized_crop(data: bytes, box: CropBox, size: int, flip: bool = False,
                 image: Optional[Image.Image] = None) -> torch.Tensor:
    """uint8 (3, size, size) of ``box`` of the encoded image, resized (bicubic, antialiased) and flipped.
    ``image``: ``data`` already opened by PIL (header only), to save a second parse."""
    image = image if image is not None else Image.open(io.BytesIO(data))
    reduction = dct_scale(box, size)
    if image.format == "JPEG" and reduction == 1:
        out = _torch_resized_crop(data, box, size)
    else:
        out = _pil_resized_crop(image, box, size, reduction if image.format == "JPEG" else 1)
    return out.flip(-1) if flip else out


def _torch_resized_crop(data: bytes, box: CropBox, size: int) -> torch.Tensor:
    top, left, h, w = box
    decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    # channels-last: torch's uint8 antialiased kernel is ~2.5x faster on it
    crop = decoded[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


def _pil_resized_crop(image: Image.Image, box: CropBox, size: int, reduction: int) -> torch.Tensor:
    top, left, h, w = box
    scale = 1.0
    if reduction > 1:
        width = image.width
        drafted = image.draft("RGB", (width // reduction, image.height // reduction))
        if drafted is not None:  # (mode, the full image's box in reduced pixels: (0, 0, W / s, H / s))
            scale = width / drafted[1][2]
    image = to_rgb(image)
    x0, y0, x1, y1 = left / scale, top / scale, (left + w) / scale, (top + h) / scale
    # crop to whole pixels first, as the PIL path does: the filter must not reach pixels outside the crop
    region = (math.floor(x0), math.floor(y0), min(math.ceil(x1), image.width), min(math.ceil(y1), image.height))
    resized = image.crop(region).resize((size, size), Image.BICUBIC,
                                        box=(x0 - region[0], y0 - region[1], x1 - region[0], y1 - region[1]))
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


class FastRandomResizedCrop:
    """Loader of the ``fast`` backend: a sample (file path or shard member) -> uint8 (3, size, size) crop of
    MAE's distribution (``crop_box``: torchvision's RandomResizedCrop with ``scale`` unless given)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 crop_box: Optional[CropSampler] = None) -> None:
        self.size, self.crop_box = size, crop_box or TorchvisionCropBox(scale)

    def __call__(self, source) -> torch.Tensor:
        data = read_bytes(source)
        image = Image.open(io.BytesIO(data))  # parses the header only
        box, flip = draw_crop(image.size, self.crop_box)
        return resized_crop(data, box, self.size, flip, image)


def normalize_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) pixel values 0..255 (uint8 or float) -> (x / 255 - mean) / std in ``dtype``, computed in
    float32."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return ((images.float() - m) / s).to(dtype)


class NormalizeOnDevice:
    """Batch hook of the ``fast`` backend: uint8 images travel to the device, are normalised there."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: Sequence[torch.Tensor], device: torch.device) -> list:
        images, *rest = batch
        images = normalize_pixels(images.to(device, non_blocking=True), self.mean, self.std)
        return [images, *(t.to(device, non_blocking=True) for t in rest)]

