"""MaskAlign pre-training.

    torchrun --nproc_per_node=8 main_pretrain.py --data_path /imagenet --output_dir out \
        --teacher openai/clip-vit-base-patch16 --teacher_weights /ckpt/ViT-B-16.pt
    python main_pretrain.py --demo          # the demo's pre-training: CPU, shipped digits, a trained small teacher
"""
import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Optional

import timm
import torch

import models_maskalign
from demo_inputs import prepare_demo
from engine import Task, amp_dtype, fit, run_main, setup
from util import args as cli
from util.data import TrainData, build_train_data
from util.distributed import DistEnv, barrier
from util.figures import tensorboard_pictures
from util.metrics import TensorboardWriter
from util.optim import adamw, param_groups_weight_decay
from util.recipes import recipes_for
from util.sampler import PerSampleSeeded
from util.signals import DEFAULT_POLICY, StopPolicy

logger = logging.getLogger("maskalign")
RECIPES = recipes_for("pretrain")
PAPER = RECIPES["pretrain_b16_paper"].flags  # the defaults
DEMO = "pretrain_demo"  # --demo's recipe


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MaskAlign pre-training")
    cli.add_recipe_arg(parser, RECIPES)
    parser.add_argument("--model", default=PAPER["model"], choices=timm.list_models("maskalign*"),
                        help="student architecture")
    parser.add_argument("--model_kwargs", nargs="*", action=cli.ParseKwargs, default={}, metavar="KEY=VALUE",
                        help="override the student architecture, e.g. depth=6 embed_dim=384 num_heads=6")
    parser.add_argument("--demo", action="store_true",
                        help=f"--recipe {DEMO}, and the digits and the label-trained teacher it needs are made "
                             "first (under --output_dir) unless given; `make demo` runs the whole comparison")
    parser.add_argument("--vis_freq", type=int, default=5,
                        help="tensorboard gets the DA heatmap, the masks and the teacher's attention every N "
                             "epochs and at the last (0: never)")
    cli.add_training_args(parser, **{k: PAPER[k] for k in ("batch_size", "epochs", "blr", "drop_path", "weight_decay")},
                          warmup_epochs=None)  # 10% of --epochs
    cli.add_maskalign_args(parser)
    return parser


# Model arguments that flags set: --model_kwargs must not give them a second value.
MODEL_FLAGS = {"img_size": "use --input_size", "drop_path_rate": "use --drop_path",
               "num_classes": "the pre-training student has no classifier", "config": "use the MaskAlign flags",
               **{name: f"use --{name}" for name in ("teacher", "teacher_weights", "teacher_kwargs",
                                                     *(f.name for f in fields(models_maskalign.MaskAlignConfig)))}}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = cli.parse(parser, argv, presets={"--demo": RECIPES[DEMO].flags}, recipes=RECIPES)
    cli.check_model(parser, args, lambda: models_maskalign.student_vit(
        args.model, img_size=args.input_size, drop_path_rate=args.drop_path, **args.model_kwargs), MODEL_FLAGS)
    return args


def build_model(args: argparse.Namespace) -> models_maskalign.MaskAlignViT:
    """The model the flags describe; a teacher that cannot be built or cannot match the student ends the
    run with its message (exit code 1), not a traceback."""
    try:
        return models_maskalign.build_from_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e


def pretrain_forward(model, batch):
    """One micro-batch: the alignment loss and its per-level parts for logging."""
    loss, _, _, level_losses = model(batch[0], return_level_losses=True)
    return loss, {f"loss_level{i}": v for i, v in enumerate(level_losses.detach().float())}  # read lazily


def prepare_demo_inputs(args: argparse.Namespace, env: DistEnv) -> None:
    """Fill in what --demo leaves open (the digits and the trained demo teacher); rank 0 makes them."""
    if env.is_main:
        prepare_demo(args)
    barrier()
    if not env.is_main:  # the same paths rank 0 filled in
        prepare_demo(args, dry=True)


def main(args: argparse.Namespace, stop_policy: StopPolicy = DEFAULT_POLICY) -> None:
    env, device = setup(args)
    if args.demo:
        prepare_demo_inputs(args, env)
    if args.data_path is None:
        raise SystemExit("--data_path is required (or --demo for the embedded default run)")
    logger.info("args: %s", json.dumps(vars(args), sort_keys=True))
    data = build_train_data(args.data_backend, args.data_path, args.input_size, file_list=args.file_list,
                            max_bad_fraction=args.max_bad_fraction)
    model = build_model(args).to(device)
    fit(args, env, device, make_task(args, model, data, device), stop_policy)


def make_task(args: argparse.Namespace, model: models_maskalign.MaskAlignViT, data: TrainData,
              device: torch.device) -> Task:
    """The pre-training task for `engine.fit`: fused AdamW, the teacher's weights kept in the autocast dtype."""
    model.teacher.set_compute_dtype(amp_dtype(args))
    optimizer = adamw(param_groups_weight_decay(model, args.weight_decay), args.blr, device, betas=(0.9, 0.95))

    pictures = tensorboard_pictures(model, data.dataset, args)

    def end_of_epoch(epoch: int, writer: TensorboardWriter) -> dict:
        pictures(epoch, writer)
        return {}

    return Task(model=model, forward_fn=pretrain_forward, dataset=PerSampleSeeded(data.dataset, args.seed),
                optimizer=optimizer, end_of_epoch=end_of_epoch, collate_fn=data.collate_fn,
                batch_to_device=data.batch_to_device)


def run(argv: Optional[Sequence[str]] = None, stop_policy: StopPolicy = DEFAULT_POLICY) -> int:
    """Entry point with exit codes: 0 done, 1 non-finite loss / bad data, 143 stopped by a signal."""
    return run_main(functools.partial(main, stop_policy=stop_policy), parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
