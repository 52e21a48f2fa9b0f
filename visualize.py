"""Pictures of what MaskAlign does, from a pre-training checkpoint or from a teacher alone.

    python visualize.py --checkpoint out/ma_b16/checkpoint-latest.pth --images img1.jpg img2.jpg --output_dir vis
    python visualize.py --teacher openai/clip-vit-base-patch16 --teacher_weights /ckpt/ViT-B-16.pt \
        --images /datasets/imagenet/val/n01440764 --output_dir vis

Writes (PNG):
  overview.png              per image: the image, the teacher's [CLS] attention, the attentive mask, a random
                            mask (the idea of the paper's Fig. 3) and, with a checkpoint, the student-vs-teacher
                            cosine similarity on each visible patch
  mask_attentive_<i>.png,   the image with every masked patch filled with MASK_FILL (pixel-exact, image size)
  mask_random_<i>.png
  alignment_matrix.png      (checkpoint) the Dynamic Alignment matrix W: student blocks x teacher blocks, with
                            values; the target levels' columns are marked
  loss_curves.png           (log.txt next to the checkpoint, or --log) total and per-level loss per epoch
"""
import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("maskalign")

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
    from util.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
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


def sample_masks(attention: torch.Tensor, mask_ratio: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(attentive, random) B x N masks, 1 = dropped, drawn as pre-training draws them."""
    from maskalign.masking import attentive_visible, mask_from_visible, num_visible, random_visible
    batch, num_patches = attention.shape
    keep = num_visible(num_patches, mask_ratio)
    generator = torch.Generator().manual_seed(seed)
    attentive = attentive_visible(attention, keep, generator=generator)
    random = random_visible(batch, num_patches, keep, attention.device, generator=generator)
    return mask_from_visible(attentive, num_patches), mask_from_visible(random, num_patches)


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


def overview_figure(pixels: np.ndarray, attention: torch.Tensor, attentive: torch.Tensor, random: torch.Tensor,
                    similarity: Optional[torch.Tensor] = None, mask_ratio: Optional[float] = None):
    """One row per image: image, [CLS] attention, attentive mask, random mask (, visible similarity)."""
    plt = _pyplot()
    columns = ["image", "teacher [CLS] attention", "attentive mask", "random mask"]
    if similarity is not None:
        columns.append("student vs teacher\ncosine (visible)")
    rows = len(pixels)
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows + 0.4), squeeze=False)
    size = pixels.shape[1]
    for r in range(rows):
        panels = [pixels[r], None, mask_overlay(pixels[r], attentive[r]), mask_overlay(pixels[r], random[r])]
        for c, panel in enumerate(panels):
            if panel is not None:
                axes[r, c].imshow(panel)
        axes[r, 1].imshow(pixels[r])
        axes[r, 1].imshow(_upsampled(attention[r], size), cmap="inferno", alpha=0.65)
        if similarity is not None:
            shown = axes[r, 4].imshow(_upsampled(similarity[r], size), cmap="viridis", vmin=-1, vmax=1)
            if r == 0:
                fig.colorbar(shown, ax=axes[:, 4].tolist(), fraction=0.04)
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


# ----------------------------------------------------------------------------- what the CLI builds

def load_model(checkpoint_path: str, teacher_weights: Optional[str] = None):
    """The MaskAlign model (student, DA and teacher) of a pre-training checkpoint, weights loaded."""
    import main_pretrain
    from util import checkpoint
    ckpt = checkpoint.load(checkpoint_path)
    if not isinstance(ckpt.get("args"), dict) or "model" not in ckpt:
        raise SystemExit(f"error: {checkpoint_path} is not a MaskAlign pre-training checkpoint (no args/model)")
    args = argparse.Namespace(**ckpt["args"])
    if teacher_weights:
        args.teacher_weights = teacher_weights
    elif args.teacher_weights and not os.path.exists(args.teacher_weights) and args.teacher_weights != "random":
        raise SystemExit(f"error: the checkpoint's teacher weights {args.teacher_weights} are not here; "
                         f"pass --teacher_weights FILE")
    model = main_pretrain.build_model(args)
    model.load_state_dict(ckpt["model"])
    return model.eval(), args


def visualize(images: torch.Tensor, pixels: np.ndarray, output_dir: str, *, teacher, model=None,
              mask_ratio: float = 0.7, log_path: Optional[str] = None, seed: int = 0) -> list[str]:
    """Write every picture that the inputs allow; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    attention = teacher_attention(teacher, images)
    attentive, random = sample_masks(attention, mask_ratio, seed)
    similarity = visible_similarity(model, images, attentive) if model is not None else None
    written = [save_figure(overview_figure(pixels, attention, attentive, random, similarity, mask_ratio),
                           os.path.join(output_dir, "overview.png"))]
    for i in range(len(pixels)):
        for name, mask in (("attentive", attentive[i]), ("random", random[i])):
            path = os.path.join(output_dir, f"mask_{name}_{i}.png")
            Image.fromarray(mask_overlay(pixels[i], mask)).save(path)
            written.append(path)
    if model is not None and model.dynamic_align.weight is not None:
        written.append(save_figure(alignment_figure(model.dynamic_align.weight, model.target_levels),
                                   os.path.join(output_dir, "alignment_matrix.png")))
    if log_path and os.path.exists(log_path):
        records = [r for r in read_log(log_path) if "train_loss" in r]
        if records:
            written.append(save_figure(loss_figure(records), os.path.join(output_dir, "loss_curves.png")))
    return written


def get_args_parser() -> argparse.ArgumentParser:
    from util import args as cli
    parser = argparse.ArgumentParser("MaskAlign pictures", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a main_pretrain.py checkpoint (student, DA and the teacher it names)")
    source.add_argument("--teacher", help="a teacher spec alone, e.g. openai/clip-vit-base-patch16")
    parser.add_argument("--teacher_weights", default=None, help="local teacher weights (overrides the checkpoint's)")
    parser.add_argument("--teacher_kwargs", nargs="*", action=cli.ParseKwargs, default={}, metavar="KEY=VALUE")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--output_dir", default="./visualize")
    parser.add_argument("--input_size", type=int, default=None, help="default: the checkpoint's, else 224")
    parser.add_argument("--mask_ratio", type=float, default=None, help="default: the checkpoint's, else 0.7")
    parser.add_argument("--log", default=None, help="log.txt for the loss curves (default: next to the checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.mask_ratio is not None and not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    files = image_files(args.images, args.num_images)
    model, log_path = None, args.log
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            parser.error(f"--checkpoint {args.checkpoint} does not exist")
        model, run_args = load_model(args.checkpoint, args.teacher_weights)
        teacher, size = model.teacher, args.input_size or run_args.input_size
        mask_ratio = args.mask_ratio if args.mask_ratio is not None else run_args.mask_ratio
        log_path = log_path or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "log.txt")
        if size != run_args.input_size:
            parser.error(f"--input_size must be the checkpoint's ({run_args.input_size}) with --checkpoint")
    else:
        from maskalign.teacher_weights import build_teacher
        size = args.input_size or 224
        mask_ratio = 0.7 if args.mask_ratio is None else args.mask_ratio
        try:
            teacher = build_teacher(args.teacher, size, 16, weights=args.teacher_weights, **args.teacher_kwargs)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from e
    images, pixels = load_images(files, size)
    written = visualize(images, pixels, args.output_dir, teacher=teacher, model=model, mask_ratio=mask_ratio,
                        log_path=log_path, seed=args.seed)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
