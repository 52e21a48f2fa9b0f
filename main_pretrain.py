"""MaskAlign pre-training.

    torchrun --nproc_per_node=8 main_pretrain.py --data_path /imagenet --output_dir out \
        --teacher openai/clip-vit-base-patch16 --teacher_weights /ckpt/ViT-B-16.pt
    python main_pretrain.py --demo          # the demo's pre-training: CPU, shipped digits, a trained small teacher
"""
import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Optional

import timm
import torch

import models_maskalign
from engine import Task, amp_dtype, fit, run_main, setup
from util import args as cli
from util.data import TrainData, build_train_data
from util.demo import DEMO_DEFAULTS, prepare_demo
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
                        help="the demo's pre-training (CPU, scikit-learn's digits, a small teacher trained on "
                             "them first); other flags override it. `make demo` runs the whole comparison")
    parser.add_argument("--vis_freq", type=int, default=5,
                        help="tensorboard gets the DA heatmap, the masks and the teacher's attention every N "
                             "epochs and at the last (0: never)")
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


def prepare_demo_inputs(args: argparse.Namespace, env: DistEnv) -> None:
    """Fill in what --demo leaves open (the digits and the trained demo teacher); rank 0 makes them."""
    if env.is_main:
        prepare_demo(args)
    barrier()
    if not env.is_main:  # the same paths rank 0 filled in
        prepare_demo(args, dry=True)


def tensorboard_pictures(model: models_maskalign.MaskAlignViT, dataset, args: argparse.Namespace):
    """end_of_epoch hook: every --vis_freq epochs (and at the last), a readable DA heatmap and the masks and
    teacher's attention on a few fixed training images (visualize.py draws both; matplotlib takes ~1 s)."""
    import visualize
    samples = getattr(dataset, "samples", [])  # image files; shard members and in-memory data draw nothing
    step = max(1, len(samples) // 16)
    files = visualize.readable_images([path for path, _ in samples[::step] if isinstance(path, str)], 4)

    def write(epoch: int, writer: TensorboardWriter) -> None:
        due = args.vis_freq and ((epoch + 1) % args.vis_freq == 0 or epoch + 1 == args.epochs)
        if writer.writer is None or not due or not files:
            return
        was_training = model.training
        if model.dynamic_align.weight is not None:
            figure = visualize.alignment_figure(model.dynamic_align.weight, model.target_levels)
            writer.image("dynamic_alignment_matrix", visualize.figure_to_chw(figure), (epoch + 1) * 1000)
        images, pixels = visualize.load_images(files, args.input_size)
        images = images.to(next(model.parameters()).device)
        attention = visualize.teacher_attention(model.teacher, images).cpu()
        attentive, random = visualize.sample_masks(attention, args.mask_ratio or 0.7, args.seed)
        similarity = visualize.visible_similarity(model, images, attentive.to(images.device))
        figure = visualize.overview_figure(pixels, attention, attentive, random, similarity, args.mask_ratio or 0.7)
        writer.image("masks_and_attention", visualize.figure_to_chw(figure), (epoch + 1) * 1000)
        model.train(was_training)
    return write


def main(args: argparse.Namespace) -> None:
    env, device = setup(args)
    if args.demo:
        prepare_demo_inputs(args, env)
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

    pictures = tensorboard_pictures(model, data.dataset, args)

    def end_of_epoch(epoch: int, writer: TensorboardWriter) -> dict:
        pictures(epoch, writer)
        return {}

    return Task(model=model, forward_fn=pretrain_forward, dataset=PerSampleSeeded(data.dataset, args.seed),
                optimizer=optimizer, end_of_epoch=end_of_epoch, collate_fn=data.collate_fn,
                batch_to_device=data.batch_to_device)


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point with exit codes: 0 done, 1 non-finite loss / bad data, 143 stopped by a signal."""
    return run_main(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
