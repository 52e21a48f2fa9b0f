"""MaskAlign pre-training.

    torchrun --nproc_per_node=8 main_pretrain.py --data_path /imagenet --output_dir out \
        --teacher openai/clip-vit-base-patch16 --teacher_weights /ckpt/ViT-B-16.pt
    python main_pretrain.py --demo          # embedded default: CPU, small real images, a few minutes
"""
import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

import timm
import torch

import models_maskalign
from engine import Task, amp_dtype, fit, run_main, setup
from util import args as cli
from util.data import TrainData, build_train_data
from util.demo import DEMO_DEFAULTS, prepare_demo_data, prepare_demo_teacher
from util.distributed import DistEnv, barrier
from util.metrics import TensorboardWriter
from util.optim import adamw, param_groups_weight_decay
from util.recipes import recipes_for
from util.sampler import PerSampleSeeded

logger = logging.getLogger("maskalign")
RECIPES = recipes_for("pretrain")


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MaskAlign pre-training")
    cli.add_recipe_arg(parser, RECIPES)
    parser.add_argument("--model", default="maskalign_vit_base_patch16", choices=timm.list_models("maskalign*"),
                        help="student architecture")
    parser.add_argument("--model_kwargs", nargs="*", action=cli.ParseKwargs, default={}, metavar="KEY=VALUE",
                        help="override the student architecture, e.g. depth=6 embed_dim=384 num_heads=6")
    parser.add_argument("--demo", action="store_true",
                        help="embedded default run (CPU, shipped images, small teacher); other flags override it")
    cli.add_training_args(parser, batch_size=128, epochs=200, blr=1.5e-4, drop_path=0.1, weight_decay=0.05,
                          warmup_epochs=None)
    cli.add_maskalign_args(parser)
    return parser


# Model arguments that flags set: --model_kwargs must not give them a second value.
MODEL_FLAGS = {"img_size": "use --input_size", "drop_path_rate": "use --drop_path",
               "num_classes": "the pre-training student has no classifier",
               **{name: f"use --{name}" for name in ("teacher", "teacher_weights", "teacher_kwargs", "mask_type",
                                                     "mask_ratio", "top_k", "align", "adaptor", "target_norm",
                                                     "loss_type", "align_cls")}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = cli.parse(parser, argv, presets={"--demo": DEMO_DEFAULTS}, recipes=RECIPES)
    cli.check_model(parser, args, lambda: models_maskalign.student_vit(
        args.model, img_size=args.input_size, drop_path_rate=args.drop_path, **args.model_kwargs), MODEL_FLAGS)
    return args


def build_model(args: argparse.Namespace) -> models_maskalign.MaskAlignViT:
    """The model the flags describe; a teacher that cannot be built or cannot match the student ends the
    run with its message (exit code 1), not a traceback."""
    try:
        return _build_model(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def _build_model(args: argparse.Namespace) -> models_maskalign.MaskAlignViT:
    return models_maskalign.__dict__[args.model](
        teacher=args.teacher, teacher_weights=args.teacher_weights, teacher_kwargs=args.teacher_kwargs,
        img_size=args.input_size,
        drop_path_rate=args.drop_path, mask_type=args.mask_type, mask_ratio=args.mask_ratio, top_k=args.top_k,
        align=args.align, adaptor=args.adaptor, target_norm=args.target_norm, loss_type=args.loss_type,
        align_cls=args.align_cls, **args.model_kwargs)


def pretrain_forward(model, batch):
    """One micro-batch: the alignment loss and its per-level parts for logging."""
    loss, _, _, level_losses = model(batch[0], return_level_losses=True)
    return loss, {f"loss_level{i}": v for i, v in enumerate(level_losses.detach().float())}  # read lazily


def prepare_demo(args: argparse.Namespace, env: DistEnv) -> None:
    """Fill in what --demo leaves open: the shipped images and, for the demo teacher, its local weights."""
    make_data = args.data_path is None
    make_teacher = args.teacher_weights is None and args.teacher == DEMO_DEFAULTS["teacher"]
    if make_data:
        args.data_path = os.path.join(args.output_dir, "demo_data")
    if make_teacher:
        args.teacher_weights = os.path.join(args.output_dir, "demo_teacher.pth")
    if env.is_main:
        if make_data:
            prepare_demo_data(args.data_path, args.seed)
        if make_teacher:
            prepare_demo_teacher(args.teacher_weights, args.seed)
    barrier()  # the other ranks read what rank 0 wrote


def alignment_matrix_image(model: models_maskalign.MaskAlignViT) -> Optional[torch.Tensor]:
    """1 x S x T image of W scaled to [0, 1] (None for layer-wise alignment, which has no W)."""
    w = model.dynamic_align.weight
    if w is None:
        return None
    w = w.detach().float().cpu()
    return ((w - w.min()) / (w.max() - w.min() + 1e-12)).unsqueeze(0)


def main(args: argparse.Namespace) -> None:
    env, device = setup(args)
    if args.demo:
        prepare_demo(args, env)
    if args.data_path is None:
        raise SystemExit("--data_path is required (or --demo for the embedded default run)")
    logger.info("args: %s", json.dumps(vars(args), sort_keys=True))
    data = build_train_data(args.data_backend, args.data_path, args.input_size, file_list=args.file_list,
                            max_bad_fraction=args.max_bad_fraction)
    model = build_model(args).to(device)
    fit(args, env, device, make_task(args, model, data, device))


def make_task(args: argparse.Namespace, model: models_maskalign.MaskAlignViT, data: TrainData,
              device: torch.device) -> Task:
    """The pre-training task for `engine.fit`: fused AdamW, the teacher's weights kept in the autocast dtype."""
    model.teacher.set_compute_dtype(amp_dtype(args))
    optimizer = adamw(param_groups_weight_decay(model, args.weight_decay), args.blr, device, betas=(0.9, 0.95))

    def end_of_epoch(epoch: int, writer: TensorboardWriter) -> dict:
        image = alignment_matrix_image(model)
        if image is not None:
            writer.image("dynamic_alignment_matrix", image, (epoch + 1) * 1000)
        return {}

    return Task(model=model, forward_fn=pretrain_forward, dataset=PerSampleSeeded(data.dataset, args.seed),
                optimizer=optimizer, end_of_epoch=end_of_epoch, collate_fn=data.collate_fn,
                batch_to_device=data.batch_to_device)


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point with exit codes: 0 done, 1 non-finite loss / bad data, 143 stopped by a signal."""
    return run_main(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
