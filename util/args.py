"""Command-line flags shared by the entry points (main_pretrain.py, main_finetune.py, submitit_launch.py, ...).

Flags keep MAE's names and meanings; the MaskAlign reference code's flag names are accepted as aliases
(docs/method.md), e.g. `--mask_type attention`, `--fusion_type linear`, `--target_norm whiten`, `--loss_weights top5`.
Validation happens here, before any model is built, and fails with exit code 2.
"""
import argparse
import ast
import os
import re
import sys
from typing import Callable, Optional, Sequence

import torch

from maskalign.alignment import ADAPTORS, ALIGN_FORMS, LOSS_TYPES, TARGET_NORMS
from maskalign.masking import MASK_TYPES
from maskalign.teachers import resolve_teacher_spec
from util.recipes import Recipe

AMP_CHOICES = ("bf16", "fp16", "none")


def _alias(mapping: dict[str, str]) -> Callable[[str], str]:
    """argparse `type` that maps the reference code's value names onto ours (and passes ours through)."""
    return lambda value: mapping.get(value, value)


def _top_k(value: str) -> int:
    """`5` or the reference code's `top5`."""
    match = re.fullmatch(r"(?:top)?(\d+)", value)
    if not match:
        raise argparse.ArgumentTypeError(f"expected K or topK (e.g. 5 or top5), got {value!r}")
    return int(match.group(1))


class ParseKwargs(argparse.Action):
    """`KEY=VALUE ...` into a dict; values are Python literals where they parse (6, 0.1, True), else strings."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string} expects KEY=VALUE items, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown; description and epilog (the recipe list) keep their line breaks."""


def new_parser(description: str) -> argparse.ArgumentParser:
    """The parser of every entry point. Abbreviations are off: `--linprob` must be an error, not a silent
    `--linprobe` that skips the presets `parse` applies for the full switch."""
    return argparse.ArgumentParser(description=description, allow_abbrev=False, formatter_class=_HelpFormatter)


def add_recipe_arg(parser: argparse.ArgumentParser, recipes: dict[str, Recipe]) -> None:
    """`--recipe NAME`: a published setting applied as defaults (see `parse`); listed at the end of --help."""
    parser.add_argument("--recipe", choices=list(recipes), default=None, metavar="NAME",
                        help="named settings (listed below), applied as defaults: explicit flags win")
    width = max(map(len, recipes))
    listing = "\n".join(f"  {name:<{width}}  [{recipe.source}] {recipe.summary}" for name, recipe in recipes.items())
    parser.epilog = "\n".join(filter(None, [parser.epilog, f"recipes (util/recipes.py has their flags):\n{listing}"]))


def add_training_args(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int, blr: float,
                      drop_path: float, weight_decay: float, warmup_epochs: Optional[float]) -> None:
    """MAE's optimisation, data, checkpoint and runtime flags; defaults are the caller's recipe."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=batch_size,
                   help="batch size per GPU (effective batch = batch_size * accum_iter * GPUs)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", type=float, default=blr, help="base lr: lr = blr * effective batch / 256")
    g.add_argument("--min_lr", type=float, default=0.0, help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=warmup_epochs,
                   help="linear warm-up epochs (default: 10%% of --epochs)" if warmup_epochs is None else None)
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--clip_grad", type=float, default=None, help="clip the global gradient norm (off by default)")
    g.add_argument("--drop_path", type=float, default=drop_path, help="stochastic depth rate of the student")
    g.add_argument("--amp", choices=AMP_CHOICES, default=None,
                   help="mixed precision (default: bf16 on CUDA, none on CPU; fp16 uses a grad scaler)")

    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="ImageFolder root (its train/ is used if present)")
    g.add_argument("--file_list", default=None,
                   help="text file of 'relative/path label' lines, paths relative to --data_path")
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--num_workers", type=int, default=10)
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin CPU memory in the data loader")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    g.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="fail only if more than this share of images is unreadable (they are skipped)")

    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt; auto-resumes from it")
    g.add_argument("--log_dir", default=None, help="tensorboard directory (default: --output_dir)")
    g.add_argument("--resume", default="", help="checkpoint to resume from (default: latest in --output_dir)")
    g.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming")
    g.add_argument("--save_freq", type=int, default=20, help="write checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--save_interval_min", type=float, default=30.0,
                   help="write checkpoint-latest.pth every N minutes (and on SIGTERM/SIGUSR1)")
    g.add_argument("--print_freq", type=int, default=20)

    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dist_timeout_min", type=int, default=30, help="collective timeout before ranks give up")
    # torch.distributed.launch (and older MAE scripts) pass this; torchrun's LOCAL_RANK is what we read
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_maskalign_args(parser: argparse.ArgumentParser) -> None:
    """Every MaskAlign option of models_maskalign.MaskAlignConfig, with the reference code's aliases."""
    g = parser.add_argument_group("MaskAlign (reference-code names in brackets)")
    g.add_argument("--teacher", "--teacher_model", dest="teacher", default="openai/clip-vit-base-patch16",
                   help="teacher spec: open_clip:NAME, timm:NAME or an alias such as "
                        "openai/clip-vit-base-patch16 [--teacher_model]")
    g.add_argument("--teacher_kwargs", nargs="*", action=ParseKwargs, default={}, metavar="KEY=VALUE",
                   help="extra keyword arguments for the teacher's model constructor")
    g.add_argument("--teacher_weights", default=None,
                   help="local teacher weights file (or an open_clip pretrained tag); needed offline")
    g.add_argument("--mask_type", type=_alias({"attention": "attentive"}), choices=MASK_TYPES,
                   default="attentive", help="[random | attention]")
    g.add_argument("--mask_ratio", type=float, default=0.7, help="share of patches the student does not see")
    g.add_argument("--top_k", "--loss_weights", dest="top_k", type=_top_k, default=5,
                   help="align the last K teacher blocks [--loss_weights topK]")
    g.add_argument("--align", dest="align", choices=ALIGN_FORMS, default="dynamic",
                   help="dynamic = eq. (1); official = the reference code's mix-then-adapt; layerwise = no W")
    # The reference code's `--fusion_type linear` mixes with W, then adapts: our `official` form.
    g.add_argument("--fusion_type", dest="align", choices=ALIGN_FORMS, default=argparse.SUPPRESS,
                   type=_alias({"linear": "official", "simple": "layerwise"}),
                   help="reference-code name: linear = --align official, simple = --align layerwise")
    g.add_argument("--adaptor", "--head_type", dest="adaptor", choices=ADAPTORS, default="linear")
    g.add_argument("--target_norm", type=_alias({"whiten": "ln"}), choices=TARGET_NORMS, default="ln",
                   help="per-token target normalisation [whiten = ln]")
    g.add_argument("--loss_type", type=_alias({"smoothl1": "smooth_l1"}), choices=LOSS_TYPES,
                   default="smooth_l1", help="smooth_l1 is the paper's eq. (3) (beta 1, not doubled)")
    g.add_argument("--align_cls", action=argparse.BooleanOptionalAction, default=True,
                   help="also align the [CLS] token")


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject inconsistent flags (exit code 2) before anything heavy runs."""
    checks = [
        (args.batch_size >= 1, "--batch_size must be >= 1"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.accum_iter >= 1, "--accum_iter must be >= 1"),
        (args.input_size % 16 == 0, f"--input_size {args.input_size} must be a multiple of the patch size 16"),
        (0.0 <= args.max_bad_fraction <= 1.0, "--max_bad_fraction must be in [0, 1]"),
        (args.save_interval_min >= 0, "--save_interval_min must be >= 0"),
        (args.save_freq >= 1, "--save_freq must be >= 1"),
        (not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} asked for but CUDA is not available; use --device cpu"),
        (args.amp != "fp16" or args.device.startswith("cuda"), "--amp fp16 needs CUDA; use bf16 or none"),
        (args.data_path is None or os.path.exists(args.data_path), f"--data_path {args.data_path} does not exist"),
        (args.file_list is None or os.path.isfile(args.file_list), f"--file_list {args.file_list} does not exist"),
        (not args.resume or os.path.isfile(args.resume), f"--resume {args.resume} does not exist"),
    ]
    if hasattr(args, "mask_ratio"):
        checks += [(0.0 <= args.mask_ratio < 1.0, f"--mask_ratio must be in [0, 1), got {args.mask_ratio}"),
                   (args.top_k >= 1, "--top_k must be >= 1")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if hasattr(args, "teacher"):
        try:
            resolve_teacher_spec(args.teacher, args.teacher_weights)
        except ValueError as e:
            parser.error(str(e))
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.1 * args.epochs
    if args.log_dir is None:
        args.log_dir = args.output_dir
    return args


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
          presets: Optional[dict[str, dict]] = None,
          recipes: Optional[dict[str, Recipe]] = None) -> argparse.Namespace:
    """Parse and validate. `presets` maps a switch (e.g. `--demo`) to the defaults it brings, and `--recipe
    NAME` brings `recipes[NAME].flags` on top of them; flags given explicitly on the command line win over
    both."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for switch, defaults in (presets or {}).items():
        if switch in argv:
            parser.set_defaults(**defaults)
    recipe = (recipes or {}).get(flag_value(argv, "--recipe"))
    if recipe is not None:  # an unknown name is left to argparse's `choices` error
        parser.set_defaults(**recipe.flags)
    return resolve(parser, parser.parse_args(argv))


def flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    """The last value given to `flag` (argparse's "last one wins"), in either `--f v` or `--f=v` form."""
    value = None
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif item.startswith(flag + "="):
            value = item.split("=", 1)[1]
    return value
