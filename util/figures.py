"""The pictures of what MaskAlign does: the teacher's [CLS] attention, the masks of every strategy, the
student-teacher similarity on the visible patches, the Dynamic Alignment matrix and the loss curves.
visualize.py writes them to files; pre-training sends them to tensorboard (`tensorboard_pictures`).
"""
import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from maskalign.masking import MASKINGS, MaskingRequest, mask_from_visible, num_visible
from models_maskalign import MaskAlignConfig
from util.metrics import TensorboardWriter

MASK_FILL = (96, 96, 96)  # masked patches in the overlays: one flat grey, so the masked share is countable
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- inputs

def image_files(paths: Sequence[str], limit: int) -> list[str]:
    """Files as given, folders expanded (sorted, recursively); at most `limit` in all."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise SystemExit(f"error: image {path} does not exist")
    if not files:
        raise SystemExit(f"error: no images found in {', '.join(paths)}")
    return files[:limit]


def readable_images(files: Sequence[str], limit: int) -> list[str]:
    """The first `limit` files that decode (training data may hold broken files; a picture must not fail)."""
    chosen = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.convert("RGB")
        except Exception:  # any decoder error: this file is not drawn
            continue
        chosen.append(path)
        if len(chosen) == limit:
            break
    return chosen


def load_images(files: Sequence[str], size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(B x 3 x size x size ImageNet-normalised tensor, B x size x size x 3 uint8 pixels): the shorter
    side resized to `size`, then the centre crop."""
    pixels = []
    for path in files:
        img = Image.open(path).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        pixels.append(np.asarray(img.crop((left, top, left + size, top + size))))
    raw = np.stack(pixels)
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255.0
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (x - mean) / std, raw


# ----------------------------------------------------------------------------- what is drawn

def teacher_attention(teacher, images: torch.Tensor) -> torch.Tensor:
    """B x N [CLS] attention of the teacher's last block (the attentive-masking weights)."""
    return teacher(images, [teacher.depth - 1], need_cls_attention=True).cls_attention


def sample_masks(attention: torch.Tensor, mask_ratio: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """B x N masks (1 = dropped) of every registered masking strategy, drawn as pre-training draws them."""
    batch, num_patches = attention.shape
    request = MaskingRequest(batch, num_patches, num_visible(num_patches, mask_ratio), attention.device, attention,
                             torch.Generator().manual_seed(seed))
    return {name: mask_from_visible(masking.sample(request), num_patches) for name, masking in MASKINGS.items()}


def mask_overlay(pixels: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """H x W x 3 uint8 image with the masked patches (mask: N, 1 = dropped, raster order) set to MASK_FILL."""
    grid = int(round(mask.numel() ** 0.5))
    cell = pixels.shape[0] // grid
    dropped = mask.reshape(grid, grid).cpu().numpy().astype(bool)
    full = np.kron(dropped, np.ones((cell, cell), dtype=bool))
    out = pixels.copy()
    out[full] = MASK_FILL
    return out


@torch.no_grad()
def visible_similarity(model, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """B x N cosine similarity between the student's prediction of the last target level and the teacher's
    normalised feature on every visible patch (NaN where masked)."""
    model.eval()
    num_patches = mask.shape[1]
    ids_keep = (mask == 0).nonzero()[:, 1].view(mask.shape[0], -1)
    with torch.no_grad():  # .forward, not model(...): eager even where --compile compiled the module's call,
        # so drawing during training adds no graph that the compile log would count as a recompile
        _, pred, _ = model.forward(images, ids_keep=ids_keep)
        target = model.targets(model.teacher(images, model.target_levels).levels, ids_keep)
    first = 1 if model.config.align_cls else 0  # the [CLS] row leads when it is aligned
    sim = torch.nn.functional.cosine_similarity(pred[-1, :, first:].float(), target[-1, :, first:], dim=-1)
    out = torch.full((mask.shape[0], num_patches), float("nan"))
    out.scatter_(1, ids_keep.cpu(), sim.cpu())
    return out


def _upsampled(values: torch.Tensor, size: int) -> np.ndarray:
    grid = int(round(values.numel() ** 0.5))
    return np.kron(values.reshape(grid, grid).float().cpu().numpy(), np.ones((size // grid, size // grid)))


def overview_figure(pixels: np.ndarray, attention: torch.Tensor, masks: dict[str, torch.Tensor],
                    similarity: Optional[torch.Tensor] = None, mask_ratio: Optional[float] = None):
    """One row per image: image, [CLS] attention, one mask per strategy (, visible similarity)."""
    plt = _pyplot()
    columns = ["image", "teacher [CLS] attention", *(f"{name} mask" for name in masks)]
    similarity_column = len(columns)
    if similarity is not None:
        columns.append("student vs teacher\ncosine (visible)")
    rows = len(pixels)
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows + 0.4), squeeze=False)
    size = pixels.shape[1]
    for r in range(rows):
        panels = [pixels[r], None, *(mask_overlay(pixels[r], mask[r]) for mask in masks.values())]
        for c, panel in enumerate(panels):
            if panel is not None:
                axes[r, c].imshow(panel)
        axes[r, 1].imshow(pixels[r])
        axes[r, 1].imshow(_upsampled(attention[r], size), cmap="inferno", alpha=0.65)
        if similarity is not None:
            shown = axes[r, similarity_column].imshow(_upsampled(similarity[r], size), cmap="viridis", vmin=-1,
                                                      vmax=1)
            if r == 0:
                fig.colorbar(shown, ax=axes[:, similarity_column].tolist(), fraction=0.04)
    for c, title in enumerate(columns):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if mask_ratio is not None:
        fig.suptitle(f"mask ratio {mask_ratio:g}: grey patches are hidden from the student", fontsize=10)
    return fig


def alignment_figure(weight: torch.Tensor, target_levels: Sequence[int]):
    """W as a heatmap with its values: rows student blocks, columns teacher blocks, target columns marked."""
    plt = _pyplot()
    w = weight.detach().float().cpu().numpy()
    students, teachers = w.shape
    fig, ax = plt.subplots(figsize=(max(4.8, 1.4 + 0.62 * teachers), max(3.0, 1.4 + 0.5 * students)))
    shown = ax.imshow(w, cmap="Blues", aspect="auto")
    fig.colorbar(shown, ax=ax, fraction=0.05)
    scale = np.abs(w).max() or 1.0
    for i in range(students):
        for j in range(teachers):
            ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if w[i, j] > 0.6 * scale else "black")
    targets = set(int(t) for t in target_levels)
    ax.set_xticks(range(teachers), [f"T{j}*" if j in targets else f"T{j}" for j in range(teachers)], fontsize=8)
    ax.set_yticks(range(students), [f"S{i}" for i in range(students)], fontsize=8)
    for j in targets:
        ax.add_patch(plt.Rectangle((j - 0.5, -0.5), 1, students, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xlabel("teacher block (* = target level, red frame)")
    ax.set_ylabel("student block")
    ax.set_title("Dynamic Alignment matrix W\n(w_ij: student block i -> teacher level j)", fontsize=9)
    fig.tight_layout()
    return fig


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_figure(records: Sequence[dict]):
    """Total and per-level training loss per epoch from MAE-style log.txt records."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    levels = sorted((k for k in records[0] if k.startswith("train_loss_level")), key=lambda k: int(k[16:]))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(epochs, [r["train_loss"] for r in records], color="black", linewidth=2, label="loss (mean of levels)")
    for key in levels:
        ax.plot(epochs, [r[key] for r in records], linewidth=1, label=f"target level {key[16:]}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("alignment loss")
    ax.legend(fontsize=7)
    ax.set_title("per-level alignment loss (level 0 = the first target block)", fontsize=9)
    fig.tight_layout()
    return fig


def figure_to_chw(fig) -> torch.Tensor:
    """3 x H x W float image in [0, 1] of a figure (for tensorboard); the figure is closed."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    _pyplot().close(fig)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def save_figure(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def tensorboard_pictures(model, dataset, args: argparse.Namespace) -> Callable[[int, TensorboardWriter], None]:
    """Pre-training's end-of-epoch pictures: every --vis_freq epochs (and at the last), the DA heatmap and the
    masks and teacher's attention on a few fixed training images (matplotlib takes ~1 s)."""
    samples = getattr(dataset, "samples", [])  # image files; shard members and in-memory data draw nothing
    step = max(1, len(samples) // 16)
    files = readable_images([path for path, _ in samples[::step] if isinstance(path, str)], 4)
    mask_ratio = args.mask_ratio or MaskAlignConfig.mask_ratio  # feature distillation (0) shows what masking hides

    def write(epoch: int, writer: TensorboardWriter) -> None:
        due = args.vis_freq and ((epoch + 1) % args.vis_freq == 0 or epoch + 1 == args.epochs)
        if writer.writer is None or not due or not files:
            return
        was_training = model.training
        if model.dynamic_align.weight is not None:
            figure = alignment_figure(model.dynamic_align.weight, model.target_levels)
            writer.image("dynamic_alignment_matrix", figure_to_chw(figure), (epoch + 1) * 1000)
        images, pixels = load_images(files, args.input_size)
        images = images.to(next(model.parameters()).device)
        attention = teacher_attention(model.teacher, images).cpu()
        masks = sample_masks(attention, mask_ratio, args.seed)
        similarity = visible_similarity(model, images, masks["attentive"].to(images.device))
        figure = overview_figure(pixels, attention, masks, similarity, mask_ratio)
        writer.image("masks_and_attention", figure_to_chw(figure), (epoch + 1) * 1000)
        model.train(was_training)
    return write
