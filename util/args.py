"""Command-line flags shared by the entry points (main_pretrain.py, main_finetune.py, submitit_launch.py, ...).

Flags keep MAE's names and meanings; the MaskAlign reference code's flag names are accepted as aliases
(docs/method.md), e.g. `--mask_type attention`, `--fusion_type linear`, `--target_norm whiten`, `--loss_weights top5`.
Validation happens here, before any model is built, and fails with exit code 2.
"""
import argparse
import ast
import copy
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from maskalign.alignment import ADAPTORS, ALIGN_FORMS, LOSS_TYPES, TARGET_NORMS
from maskalign.masking import MASKINGS, num_visible
from maskalign.teacher_weights import RANDOM_WEIGHTS, hub_source, resolve_teacher_spec
from models_maskalign import DEFAULT_TEACHER, MaskAlignConfig
from util.data import DATA_BACKENDS, check_data_root, count_classes
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


def _fusion_type(value: str) -> str:
    """The reference code's --fusion_type names for our --align forms ('sum' has no counterpart here)."""
    forms = {"linear": "official", "simple": "layerwise"}
    if value in ALIGN_FORMS:  # our own names pass: a recipe's `align` default reaches this flag too (same dest)
        return value
    if value not in forms:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose linear = --align official, or "
                                         f"simple = --align layerwise)")
    return forms[value]


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


_STATES_DEFAULT = re.compile(r"\(default|default:|by default", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every option's default exactly once: appended unless the help text already states it,
    also for options without help text (argparse shows nothing for them). A switch says whether it is on by
    default (argparse would print its destination's value: True for --cls_token, which is off). Description
    and epilog (the recipe list) keep their line breaks."""

    def add_argument(self, action: argparse.Action) -> None:
        if not action.help and _shows_default(action):
            action = copy.copy(action)  # the parser's own action keeps its (empty) help
            action.help = f"(default: {_default_text(action)})"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action) or _STATES_DEFAULT.search(text):
            return text
        return f"{text} (default: {_default_text(action)})"


def _shows_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default is not argparse.SUPPRESS


def _default_text(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    if action.nargs == 0:  # store_true / store_false / store_const
        return "on" if action.default == action.const else "off"
    return "not set" if action.default in (None, "") else "%(default)s"


def new_parser(description: str) -> argparse.ArgumentParser:
    """The parser of every entry point. Abbreviations are off: `--linprob` must be an error, not a silent
    `--linprobe` that skips the presets `parse` applies for the full switch."""
    return argparse.ArgumentParser(description=description, allow_abbrev=False, formatter_class=HelpFormatter)


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
    g.add_argument("--data_path", default=None,
                   help="ImageFolder root (its train/ is used if present), or WebDataset tar shards: a brace "
                        "pattern ('/shards/train-{000000..000127}.tar'), a .tar file or a folder of .tar files")
    g.add_argument("--file_list", default=None,
                   help="text file of 'relative/path label' lines, paths relative to --data_path")
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--data_backend", choices=DATA_BACKENDS, default="pil",
                   help="training crops: pil = MAE's transform; fast = uint8 crops, reduced-size JPEG decoding, "
                        "normalised on the device (~2-3x the images/s per core); gpu = JPEGs decoded and cropped on "
                        "the GPU (nvJPEG), workers only read bytes")
    g.add_argument("--num_workers", type=int, default=10)
    g.add_argument("--prefetch_factor", type=int, default=2, help="batches each data worker prepares ahead")
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
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda where available, else cpu)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (pre-training: student, alignment and teacher); same numbers as "
                        "eager, the first steps are slower while it compiles")
    g.add_argument("--dist_timeout_min", type=int, default=30, help="collective timeout before ranks give up")
    # torch.distributed.launch (and older MAE scripts) pass this; torchrun's LOCAL_RANK is what we read
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_maskalign_args(parser: argparse.ArgumentParser) -> None:
    """Every MaskAlign option of models_maskalign.MaskAlignConfig, with its defaults (the paper's) and the
    reference code's aliases."""
    paper = MaskAlignConfig()
    g = parser.add_argument_group("MaskAlign (reference-code names in brackets)")
    g.add_argument("--teacher", "--teacher_model", dest="teacher", default=DEFAULT_TEACHER,
                   help="teacher spec: open_clip:NAME, timm:NAME or an alias such as "
                        "openai/clip-vit-base-patch16 [--teacher_model]")
    g.add_argument("--teacher_kwargs", nargs="*", action=ParseKwargs, default={}, metavar="KEY=VALUE",
                   help="extra keyword arguments for the teacher's model constructor")
    g.add_argument("--teacher_weights", default=None,
                   help="local teacher weights file (or an open_clip pretrained tag); needed offline")
    g.add_argument("--mask_type", type=_alias({"attention": "attentive"}), choices=tuple(MASKINGS),
                   default=paper.mask_type,
                   help="which patches the student sees: random, or attentive (sampled by the teacher's [CLS] "
                        "attention) [attention = attentive]")
    g.add_argument("--mask_ratio", type=float, default=paper.mask_ratio,
                   help="share of patches the student does not see")
    g.add_argument("--top_k", "--loss_weights", dest="top_k", type=_top_k, default=paper.top_k,
                   help="align the last K teacher blocks [--loss_weights topK]")
    g.add_argument("--align", dest="align", choices=ALIGN_FORMS, default=paper.align,
                   help="dynamic = eq. (1); official = the reference code's mix-then-adapt; layerwise = no W")
    # The reference code's `--fusion_type linear` mixes with W, then adapts: our `official` form.
    g.add_argument("--fusion_type", dest="align", default=argparse.SUPPRESS, type=_fusion_type,
                   metavar="{linear,simple}",
                   help="the reference code's name for --align: linear = official, simple = layerwise")
    g.add_argument("--adaptor", "--head_type", dest="adaptor", choices=ADAPTORS, default=paper.adaptor)
    g.add_argument("--target_norm", type=_alias({"whiten": "ln"}), choices=TARGET_NORMS, default=paper.target_norm,
                   help="per-token target normalisation [whiten = ln]")
    g.add_argument("--loss_type", type=_alias({"smoothl1": "smooth_l1"}), choices=LOSS_TYPES,
                   default=paper.loss_type, help="smooth_l1 is the paper's eq. (3) (beta 1, not doubled)")
    g.add_argument("--align_cls", action=argparse.BooleanOptionalAction, default=paper.align_cls,
                   help="also align the [CLS] token")


PATCH_SIZE = 16  # every student and fine-tuning ViT here is /16 unless --model_kwargs patch_size=... says otherwise


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults and reject inconsistent flags (exit code 2) before anything heavy runs."""
    patch = _patch_size(args)
    checks = [
        (args.batch_size >= 1, "--batch_size must be >= 1"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (0 <= args.start_epoch < args.epochs,
         f"--start_epoch {args.start_epoch} must be in [0, --epochs {args.epochs}): no epoch would run"),
        (args.accum_iter >= 1, "--accum_iter must be >= 1"),
        (args.lr is None or args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.blr > 0, f"--blr must be > 0, got {args.blr}"),
        (args.min_lr >= 0, f"--min_lr must be >= 0, got {args.min_lr}"),
        (args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}"),
        (args.clip_grad is None or args.clip_grad > 0,
         f"--clip_grad is the largest gradient norm allowed and must be > 0, got {args.clip_grad} "
         f"(leave the flag out to train without clipping)"),
        (args.warmup_epochs is None or args.warmup_epochs >= 0,
         f"--warmup_epochs must be >= 0, got {args.warmup_epochs}"),
        (0.0 <= args.drop_path < 1.0, f"--drop_path is a probability and must be in [0, 1), got {args.drop_path}"),
        (args.input_size > 0 and args.input_size % patch == 0,
         f"--input_size {args.input_size} must be a positive multiple of the patch size {patch}"),
        (args.num_workers >= 0,
         f"--num_workers must be >= 0 (0 loads data in the main process), got {args.num_workers}"),
        (args.print_freq >= 1, f"--print_freq must be >= 1 (log every N steps), got {args.print_freq}"),
        (0.0 <= args.max_bad_fraction <= 1.0, "--max_bad_fraction must be in [0, 1]"),
        (args.save_interval_min >= 0, "--save_interval_min must be >= 0"),
        (args.save_freq >= 1, "--save_freq must be >= 1"),
        (not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} asked for but CUDA is not available; use --device cpu"),
        (args.amp != "fp16" or args.device.startswith("cuda"), "--amp fp16 needs CUDA; use bf16 or none"),
        (args.prefetch_factor >= 1, "--prefetch_factor must be >= 1"),
        (args.data_backend != "gpu" or args.device.startswith("cuda"),
         "--data_backend gpu decodes on the GPU and needs --device cuda; use --data_backend fast on CPU"),
        (args.file_list is None or os.path.isfile(args.file_list), f"--file_list {args.file_list} does not exist"),
        (not args.resume or os.path.isfile(args.resume), f"--resume {args.resume} does not exist"),
    ]
    if hasattr(args, "mask_ratio"):
        checks += [(0.0 <= args.mask_ratio < 1.0, f"--mask_ratio must be in [0, 1), got {args.mask_ratio}"),
                   (args.top_k >= 1, "--top_k must be >= 1")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if hasattr(args, "mask_ratio"):
        _check_visible_patches(parser, args, patch)
    if args.data_path is not None:
        _check_data(parser, args)
    _check_output_dir(parser, args.output_dir)
    if hasattr(args, "teacher"):
        _check_teacher(parser, args.teacher, args.teacher_weights)
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.1 * args.epochs
    if args.log_dir is None:
        args.log_dir = args.output_dir
    return args


def given_on_command_line(make_parser: Callable[[], argparse.ArgumentParser],
                          argv: Optional[Sequence[str]] = None) -> set[str]:
    """The dests that `argv` sets itself, not through a default or a preset (on a fresh parser, whose
    defaults are all removed)."""
    parser = make_parser()
    parser._defaults.clear()  # set_defaults(...) values
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv))))


def _patch_size(args: argparse.Namespace) -> int:
    patch = getattr(args, "model_kwargs", {}).get("patch_size", PATCH_SIZE)
    return patch if isinstance(patch, int) and patch > 0 else PATCH_SIZE  # a bad value is reported by check_model


def _check_visible_patches(parser: argparse.ArgumentParser, args: argparse.Namespace, patch: int) -> None:
    """MAE keeps int(N * (1 - mask_ratio)) patches: with few patches that can be none at all."""
    num_patches = (args.input_size // patch) ** 2
    if num_visible(num_patches, args.mask_ratio) < 1:
        parser.error(f"--mask_ratio {args.mask_ratio} at --input_size {args.input_size} leaves the student "
                     f"int({num_patches} x (1 - {args.mask_ratio})) = 0 of {num_patches} patches to see; "
                     f"lower --mask_ratio or raise --input_size")


def _check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        check_data_root(args.data_path, "train", args.file_list)
    except (OSError, ValueError) as e:
        parser.error(str(e))


def _check_output_dir(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """The run must be able to create its directory and write checkpoints into it; finding out after the
    first epoch would lose that epoch. A real write, because permission bits say nothing about read-only
    file systems, nor about what root may do."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"--output_dir {output_dir}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        parser.error(f"--output_dir {output_dir}: cannot write in {existing} ({e.strerror}); "
                     f"choose another --output_dir")


def _check_teacher(parser: argparse.ArgumentParser, teacher: str, weights: Optional[str]) -> None:
    """A teacher spec that resolves, and weights that are a file, a hub tag or 'random' (a missing file
    would otherwise surface only after the data is listed, or after a SLURM queue)."""
    try:
        spec = resolve_teacher_spec(teacher, weights)
    except ValueError as e:
        parser.error(str(e))
    if spec.weights in (None, RANDOM_WEIGHTS) or os.path.isfile(spec.weights) or hub_source(spec) is not None:
        return
    given = f"--teacher_weights {weights}" if weights else f"--teacher {teacher}"
    parser.error(f"{given}: no such file" + (f" and not a pretrained tag of open_clip's {spec.model_name}"
                                             if spec.library == "open_clip" else ""))


def check_model(parser: argparse.ArgumentParser, args: argparse.Namespace, build: Callable[[], torch.nn.Module],
                set_by_flags: dict[str, str]) -> None:
    """--model_kwargs against the architecture, before any real model exists: a key that a flag owns is
    refused, then `build()` runs on the meta device (no memory, no weights, no teacher), so an unknown key,
    a wrong type (depth=abc) or an impossible shape fails here with exit code 2."""
    for key in args.model_kwargs:
        if key in set_by_flags:
            parser.error(f"--model_kwargs {key}=...: {set_by_flags[key]}")
    try:
        with torch.device("meta"):
            build()
    except Exception as e:  # the constructor's own message names the argument; it is the user's input
        given = " ".join(f"{k}={v}" for k, v in args.model_kwargs.items())
        parser.error(f"--model {args.model}" + (f" with --model_kwargs {given}" if given else "")
                     + f" cannot be built: {type(e).__name__}: {e}")


def resolve_classification(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fine-tuning, linear probing and --eval: an existing --finetune file, a validation set that is not the
    training set, and --nb_classes that fits the data (inferred from it when not given)."""
    if args.finetune and not os.path.isfile(args.finetune):
        parser.error(f"--finetune {args.finetune} does not exist")
    if args.val_file_list is not None and not os.path.isfile(args.val_file_list):
        parser.error(f"--val_file_list {args.val_file_list} does not exist")
    if args.data_path is None:
        return
    if "{" in args.data_path:
        parser.error("a shard pattern names one split; for train and val shards pass a folder holding "
                     "train/*.tar and val/*.tar")
    if args.val_file_list is None and not os.path.isdir(os.path.join(args.data_path, "val")):
        parser.error(f"--data_path {args.data_path} has no val/ folder. Every epoch is evaluated on "
                     f"<data_path>/val/<class>/<image> (MAE's layout); add that folder or give "
                     f"--val_file_list FILE ('relative/path label' lines, paths relative to --data_path)")
    try:
        check_data_root(args.data_path, "val", args.val_file_list)
        num_classes = _class_count(args)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if args.nb_classes is None:
        args.nb_classes = num_classes
    elif args.nb_classes < num_classes:
        parser.error(f"--nb_classes {args.nb_classes} is smaller than the {num_classes} classes in "
                     f"{args.data_path}; leave it out to use the data's count")
    elif args.nb_classes > num_classes and os.environ.get("RANK", "0") == "0":
        print(f"warning: --nb_classes {args.nb_classes} but {args.data_path} has {num_classes} classes; "
              f"{args.nb_classes - num_classes} outputs of the head will never be trained", file=sys.stderr)


def _class_count(args: argparse.Namespace) -> int:
    """Classes of train and val together; two ImageFolders must name the same classes, since each numbers
    its own sorted folders and a class missing on one side would shift every label after it."""
    val, val_names = count_classes(args.data_path, "val", args.val_file_list)
    if args.eval:  # the training set plays no part
        return val
    train, train_names = count_classes(args.data_path, "train", args.file_list)
    if train_names is not None and val_names is not None and train_names != val_names:
        only_train, only_val = sorted(set(train_names) - set(val_names)), sorted(set(val_names) - set(train_names))
        raise ValueError(f"the class folders of the training and validation sets differ (only in training: "
                         f"{only_train[:5]}, only in val/: {only_val[:5]}), so their labels would not match")
    return max(train, val)


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
