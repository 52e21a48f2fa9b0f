"""Pictures of what MaskAlign does, from a pre-training checkpoint or from a teacher alone.

    python visualize.py --checkpoint out/ma_b16/checkpoint-latest.pth --images img1.jpg img2.jpg --output_dir vis
    python visualize.py --teacher openai/clip-vit-base-patch16 --teacher_weights /ckpt/ViT-B-16.pt \
        --images /datasets/imagenet/val/n01440764 --output_dir vis

Writes (PNG):
  overview.png              per image: the image, the teacher's [CLS] attention, the mask of every masking strategy
                            (the idea of the paper's Fig. 3) and, with a checkpoint, the student-vs-teacher
                            cosine similarity on each visible patch
  mask_<strategy>_<i>.png   the image with every masked patch filled in one grey (pixel-exact, image size), for
                            each strategy of maskalign.masking.MASKINGS (attentive, random)
  alignment_matrix.png      (checkpoint) the Dynamic Alignment matrix W: student blocks x teacher blocks, with
                            values; the target levels' columns are marked
  loss_curves.png           (log.txt next to the checkpoint, or --log) total and per-level loss per epoch
"""
import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

import models_maskalign
from maskalign.teacher_weights import build_teacher
from models_maskalign import MaskAlignConfig
from util import args as cli
from util import checkpoint
from util.figures import (
    alignment_figure,
    image_files,
    load_images,
    loss_figure,
    mask_overlay,
    overview_figure,
    read_log,
    sample_masks,
    save_figure,
    teacher_attention,
    visible_similarity,
)

logger = logging.getLogger("maskalign")


# ----------------------------------------------------------------------------- what the CLI builds

def load_model(checkpoint_path: str, teacher_weights: Optional[str] = None):
    """The MaskAlign model (student, DA and teacher) of a pre-training checkpoint, weights loaded."""
    ckpt = checkpoint.load(checkpoint_path)
    if not isinstance(ckpt.get("args"), dict) or "model" not in ckpt:
        raise SystemExit(f"error: {checkpoint_path} is not a MaskAlign pre-training checkpoint (no args/model)")
    args = argparse.Namespace(**ckpt["args"])
    if teacher_weights:
        args.teacher_weights = teacher_weights
    elif args.teacher_weights and not os.path.exists(args.teacher_weights) and args.teacher_weights != "random":
        raise SystemExit(f"error: the checkpoint's teacher weights {args.teacher_weights} are not here; "
                         f"pass --teacher_weights FILE")
    model = _built(lambda: models_maskalign.build_from_args(args))
    model.load_state_dict(ckpt["model"])
    return model.eval(), args


def _built(build: Callable[[], Any]) -> Any:
    """A model or teacher the user's files and flags describe; what they got wrong is one line, exit 1."""
    try:
        return build()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def visualize(images: torch.Tensor, pixels: np.ndarray, output_dir: str, *, teacher, model=None,
              mask_ratio: float = MaskAlignConfig.mask_ratio, log_path: Optional[str] = None,
              seed: int = 0) -> list[str]:
    """Write every picture that the inputs allow; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    attention = teacher_attention(teacher, images)
    masks = sample_masks(attention, mask_ratio, seed)
    similarity = visible_similarity(model, images, masks["attentive"]) if model is not None else None
    written = [save_figure(overview_figure(pixels, attention, masks, similarity, mask_ratio),
                           os.path.join(output_dir, "overview.png"))]
    for i in range(len(pixels)):
        for name, mask in masks.items():
            path = os.path.join(output_dir, f"mask_{name}_{i}.png")
            Image.fromarray(mask_overlay(pixels[i], mask[i])).save(path)
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
    parser = cli.new_parser("MaskAlign pictures")
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
        size = args.input_size or 224
        mask_ratio = MaskAlignConfig.mask_ratio if args.mask_ratio is None else args.mask_ratio
        teacher = _built(lambda: build_teacher(args.teacher, size, cli.PATCH_SIZE, weights=args.teacher_weights,
                                               **args.teacher_kwargs))
    images, pixels = load_images(files, size)
    written = visualize(images, pixels, args.output_dir, teacher=teacher, model=model, mask_ratio=mask_ratio,
                        log_path=log_path, seed=args.seed)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
