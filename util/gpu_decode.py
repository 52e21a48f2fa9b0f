"""The `gpu` data backend: workers read the bytes and draw the crop (`EncodedCrop`, the PIL path's RNG calls);
the device decodes whole batches with nvJPEG and crops them with `roi_align` (`DecodeOnDevice`). A file nvJPEG
refuses is decoded on the CPU; one nothing decodes counts as a bad image and is replaced by another crop of
the batch. Everything also runs on CPU tensors, which is how the tests exercise it. docs/data.md has more.
"""
import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from util.bad_images import TooManyBadSamplesError
from util.fast_crop import CropSampler, TorchvisionCropBox, draw_crop, normalize_pixels, to_rgb
from util.shards import read_bytes

logger = logging.getLogger("maskalign.data")

_EOI, _EOI_WINDOW = b"\xff\xd9", 4096  # JPEG end-of-image marker; some files carry trailing bytes after it
# (encoded bytes, crop box (x0, y0, x1, y1) in pixels of the full image, flip, name for the log)
EncodedSample = tuple[torch.Tensor, torch.Tensor, bool, str]


class EncodedCrop:
    """Loader of the ``gpu`` backend: a sample's bytes and its crop, nothing decoded (``crop_box`` as in
    `FastRandomResizedCrop`)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 crop_box: Optional[CropSampler] = None) -> None:
        self.size, self.crop_box = size, crop_box or TorchvisionCropBox(scale)

    def __call__(self, source) -> EncodedSample:
        data = read_bytes(source)
        image = Image.open(io.BytesIO(data))  # header only; garbage fails here, in the worker
        if image.format == "JPEG" and _EOI not in data[-_EOI_WINDOW:]:
            # the commonest corruption; caught here, it does not depend on how nvJPEG treats a cut file
            raise OSError("JPEG without an end-of-image marker (truncated file)")
        width_height = image.size
        (top, left, h, w), flip = draw_crop(width_height, self.crop_box)
        box = torch.tensor([left, top, left + w, top + h], dtype=torch.float32)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip, str(source)


def collate_encoded(batch: Sequence[tuple[EncodedSample, int]]) -> list:
    """[list of byte tensors, boxes (B, 4), flips (B,), labels (B,), names]: bytes differ in length."""
    samples, labels = zip(*batch)
    data, boxes, flips, names = zip(*samples)
    return [list(data), torch.stack(boxes), torch.tensor(flips), torch.tensor(labels), list(names)]


def crop_boxes(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, C, size, size) in 0..255: ``boxes[k]`` (x0, y0, x1, y1) of ``images[k]`` (C, H, W), resized.
    One roi_align per distinct image size, so a batch of mostly 500x375 photos is a handful of calls."""
    out = torch.empty(len(images), images[0].shape[0], size, size, device=images[0].device)
    by_shape = defaultdict(list)
    for k, image in enumerate(images):
        by_shape[tuple(image.shape)].append(k)
    boxes = boxes.to(images[0].device, torch.float32)
    for members in by_shape.values():
        stack = torch.stack([images[k] for k in members]).float()
        index = torch.tensor(members, device=stack.device)
        rois = torch.cat([torch.arange(len(members), device=stack.device, dtype=torch.float32)[:, None],
                          boxes[index]], dim=1)
        # aligned: box coordinates are pixel edges (pixel i spans [i, i + 1)), as in the CPU crop
        out[index] = roi_align(stack, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out


class DecodeOnDevice:
    """Batch hook of the ``gpu`` backend: decode, crop, flip, substitute bad images, normalise."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], dataset) -> None:
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.dataset = dataset  # its shared counters take the bad images found here

    def __call__(self, batch: list, device: torch.device) -> list:
        data, boxes, flips, labels, names = batch
        images = self._decode_all(data, names, device)
        good = [k for k, image in enumerate(images) if image is not None]
        if not good:  # a data failure: it goes into the loop's vote, so every rank stops together
            raise TooManyBadSamplesError(f"no image of a batch of {len(images)} could be decoded (first: {names[0]}); "
                               f"is the data readable?")
        crops = crop_boxes([images[k] for k in good], boxes[good], self.size)
        flip = flips[good].to(crops.device)
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
        # a bad image's place goes to the next good one's crop and label (deterministic, keeps the batch size)
        position = [_next_good(k, good) for k in range(len(images))]
        crops = crops[torch.tensor(position, device=crops.device)]
        labels = labels[torch.tensor([good[p] for p in position])]
        return [normalize_pixels(crops, self.mean, self.std), labels.to(device, non_blocking=True)]

    def _decode_all(self, data: list[torch.Tensor], names: list[str], device: torch.device) \
            -> list[Optional[torch.Tensor]]:
        try:  # one call for the batch: nvJPEG batches the Huffman and IDCT work
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            return [self._decode_one(d, name, device) for d, name in zip(data, names)]

    def _decode_one(self, data: torch.Tensor, name: str, device: torch.device) -> Optional[torch.Tensor]:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
        try:  # not a JPEG nvJPEG takes (PNG, CMYK, ...): the CPU decodes it
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                array = np.asarray(to_rgb(image)).copy()
            return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(device)
        except Exception as e:  # any decoder failure on this one file means the file is bad
            self.dataset.record_bad(name, e, count_attempt=False)
            return None


def _next_good(k: int, good: list[int]) -> int:
    """Position in ``good`` of sample k itself if good, else of the first good sample after it (cyclic)."""
    later = [i for i, g in enumerate(good) if g >= k]
    return later[0] if later else 0
