"""Fine-tuning, linear probing (`--linprobe`) and evaluation (`--eval`) of a pre-trained student, or of any
timm / MAE / reference-code ViT checkpoint, following MAE's main_finetune.py and main_linprobe.py.

    torchrun --nproc_per_node=8 main_finetune.py --finetune out/ma_b16/checkpoint-199.pth \
        --model vit_base_patch16_224 --data_path /imagenet --output_dir out/ft_b16 --model_ema
    torchrun --nproc_per_node=8 main_finetune.py --linprobe --finetune out/ma_b16/checkpoint-199.pth ...
    python main_finetune.py --eval --resume out/ft_b16/checkpoint-best.pth --data_path /imagenet

Defaults are the paper's (recipe finetune_b16_paper); `--linprobe`'s are MAE's (linprobe_mae). docs/training.md
lists what matches MAE and what differs on purpose.
"""
import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from engine import Task, evaluate, fit, run_main, setup
from util import args as cli
from util import checkpoint
from util.data import TrainData, build_dataset, build_finetune_transform, build_train_data
from util.distributed import DistEnv
from util.metrics import TensorboardWriter
from util.optim import LARS, adamw, param_groups_layer_decay
from util.pretrained import load_into, read_backbone
from util.recipes import LINPROBE_EFFECTIVE_BATCH, recipes_for
from util.sampler import PerSampleSeeded
from util.signals import DEFAULT_POLICY, StopPolicy

logger = logging.getLogger("maskalign")

RECIPES = recipes_for("finetune", "linprobe")
PAPER = RECIPES["finetune_b16_paper"].flags  # the defaults; --linprobe's are RECIPES["linprobe_mae"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MaskAlign fine-tuning / linear probing")
    cli.add_recipe_arg(parser, RECIPES)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=PAPER["model"], help="timm ViT to fine-tune")
    g.add_argument("--model_kwargs", nargs="*", action=cli.ParseKwargs, default={}, metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, e.g. depth=6")
    g.add_argument("--finetune", default="", help="pre-trained checkpoint: ours, MAE's, the reference "
                                                  "MaskAlign code's, a timm state dict or .safetensors")
    g.add_argument("--pos_embed_antialias", action="store_true",
                   help="resize a pre-trained position embedding with timm's antialiased bicubic instead of "
                        "MAE's plain bicubic (F.interpolate)")
    g.add_argument("--nb_classes", type=int, default=None, help="classifier outputs (default: the number of "
                   "classes in the data; a larger value is allowed with a warning, a smaller one is refused)")
    g.add_argument("--global_pool", action="store_true", default=PAPER["global_pool"],
                   help="average-pool the patch tokens")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify from [CLS] instead")
    g.add_argument("--linprobe", action="store_true", help="linear probing: frozen backbone, BN + linear head")
    g.add_argument("--linprobe_crop", choices=("mae", "torchvision"), default="mae",
                   help="--linprobe's random resized crop: MAE's single-draw TF-style crop, or torchvision's")
    g.add_argument("--opt", choices=("adamw", "lars", "sgd"), default=PAPER["opt"],
                   help="fine-tuning: any, with layer decay and weight-decay groups; --linprobe: lars or sgd")
    g.add_argument("--layer_decay", type=float, default=PAPER["layer_decay"], help="layer-wise lr decay (fine-tuning)")
    g.add_argument("--model_ema", action="store_true",
                   help="keep an EMA of the weights: evaluated every epoch, saved as `model_ema`, and "
                        "checkpoint-best.pth holds whichever of model / EMA scored the best top-1")
    g.add_argument("--model_ema_decay", type=float, default=0.9999)

    g = parser.add_argument_group("augmentation and regularisation (MAE's fine-tuning recipe)")
    g.add_argument("--color_jitter", type=float, default=None)
    g.add_argument("--aa", default=PAPER["aa"], help="RandAugment policy ('' to disable)")
    g.add_argument("--smoothing", type=float, default=PAPER["smoothing"], help="label smoothing")
    g.add_argument("--reprob", type=float, default=PAPER["reprob"], help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=PAPER["mixup"], help="mixup alpha (0 disables)")
    g.add_argument("--cutmix", type=float, default=PAPER["cutmix"], help="cutmix alpha (0 disables)")
    g.add_argument("--cutmix_minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--mixup_mode", choices=("batch", "pair", "elem"), default="batch")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate (--resume or --finetune weights)")
    g.add_argument("--eval_ema", action="store_true", help="with --eval --resume: evaluate the checkpoint's "
                                                           "`model_ema` weights instead of `model`")
    g.add_argument("--dist_eval", action="store_true", help="shard the validation set across processes")
    g.add_argument("--val_file_list", default=None, help="validation set as a file list ('path label' lines) "
                   "instead of <data_path>/val/; without either, fine-tuning refuses to start")

    cli.add_training_args(parser, **{k: PAPER[k] for k in ("batch_size", "epochs", "blr", "drop_path", "weight_decay",
                                                            "warmup_epochs")})
    parser.set_defaults(min_lr=PAPER["min_lr"], accum_iter=PAPER["accum_iter"])
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_args_and_checkpoint(argv)[0]


def parse_args_and_checkpoint(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, Optional[dict]]:
    """The arguments, and with `--eval --resume CKPT` the checkpoint they adopted the architecture from (read
    once: main() evaluates its weights); None when there is none or it is unusable (main() reports that)."""
    parser = get_args_parser()
    args = cli.parse(parser, argv, presets={"--linprobe": RECIPES["linprobe_mae"].flags}, recipes=RECIPES)
    cli.resolve_classification(parser, args)
    if args.recipe and args.linprobe != (RECIPES[args.recipe].task == "linprobe"):
        parser.error(f"--recipe {args.recipe} is a {RECIPES[args.recipe].task} recipe; "
                     f"{'drop' if args.linprobe else 'add'} --linprobe")
    if args.linprobe and args.opt == "adamw":
        parser.error("--linprobe trains with LARS (MAE's protocol) or SGD: use --opt lars or --opt sgd")
    if args.eval_ema and not (args.eval and args.resume):
        parser.error("--eval_ema evaluates the `model_ema` of a checkpoint: use it with --eval --resume FILE")
    if mixup_active(args) and args.batch_size % 2:
        parser.error("mixup/cutmix need an even --batch_size")
    if args.data_backend != "pil" and not args.linprobe:
        parser.error("fine-tuning's RandAugment works on PIL images: --data_backend fast/gpu serve pre-training "
                     "and --linprobe")
    if args.model not in timm.list_models() and args.model not in timm.list_models(pretrained=True):
        parser.error(f"--model {args.model} is not a timm model")
    resumed = None
    if args.eval and args.resume:
        resumed = read_checkpoint(args.resume)
        data_classes = args.nb_classes  # the validation set's, unless --nb_classes says otherwise
        adopt_checkpoint_architecture(args, resumed, cli.given_on_command_line(get_args_parser, argv))
        if data_classes is not None and args.nb_classes not in (None, data_classes):
            hint = (f" (or give --nb_classes {args.nb_classes} if these labels are among its classes)"
                    if args.nb_classes > data_classes else "")
            parser.error(f"--resume {args.resume} classifies {args.nb_classes} classes but the validation set "
                         f"{args.val_file_list or os.path.join(args.data_path, 'val')} has {data_classes}: "
                         f"evaluate it on the data it was trained on{hint}")
        resumed = eval_weights_only(resumed, "model_ema" if args.eval_ema else "model")
    cli.check_model(parser, args, lambda: create_vit(args), MODEL_FLAGS)
    return args, resumed


# The flags that shape the model: `--eval --resume CKPT` takes them from CKPT's args (MAE uses the same names).
ARCHITECTURE_ARGS = ("model", "model_kwargs", "nb_classes", "input_size", "linprobe", "global_pool")


def read_checkpoint(path: str) -> Optional[dict]:
    try:
        ckpt = checkpoint.load(path)
    except checkpoint.CheckpointError:
        return None  # main() reports an unusable file (exit code 1)
    return ckpt if isinstance(ckpt, dict) else None


def eval_weights_only(ckpt: Optional[dict], key: str) -> Optional[dict]:
    """`ckpt` holding only the `key` weights that --eval loads (the other entries' names stay, for messages):
    the optimizer state and the other weights are not held in memory until evaluation ends."""
    return None if ckpt is None else {name: value if name == key else None for name, value in ckpt.items()}


def adopt_checkpoint_architecture(args: argparse.Namespace, ckpt: Optional[dict], given: set[str]) -> None:
    """Build the model that `ckpt` (the --resume file) was trained as, unless the command line says otherwise."""
    stored = (ckpt or {}).get("args")
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else stored
    if not isinstance(stored, dict):
        return
    adopted = {k: stored[k] for k in ARCHITECTURE_ARGS
               if k in stored and k not in given and stored[k] != getattr(args, k)}
    if adopted.get("model") not in (None, *timm.list_models()):  # MAE's models_vit names are not timm's
        del adopted["model"]
    if adopted:
        vars(args).update(adopted)
        logger.warning("--eval: model flags from %s: %s", args.resume,
                       " ".join(f"--{k} {v}" for k, v in adopted.items()))


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# Model arguments that flags set: --model_kwargs must not give them a second value.
MODEL_FLAGS = {"num_classes": "use --nb_classes", "img_size": "use --input_size", "drop_path_rate": "use --drop_path",
               "global_pool": "use --global_pool or --cls_token", "pretrained": "use --finetune FILE"}


def create_vit(args) -> nn.Module:
    return timm.create_model(args.model, pretrained=False, num_classes=args.nb_classes or 1000,
                             img_size=args.input_size, drop_path_rate=args.drop_path,
                             global_pool="avg" if args.global_pool else "token", **args.model_kwargs)


def build_model(args) -> nn.Module:
    model = create_vit(args)
    if args.finetune:
        load_into(model, read_backbone(args.finetune), expected_name=args.model,
                  antialias_pos_embed=args.pos_embed_antialias)
    nn.init.trunc_normal_(model.head.weight, std=0.01 if args.linprobe else 2e-5)
    nn.init.zeros_(model.head.bias)
    if args.linprobe:  # MAE: BatchNorm without affine in front of the linear head, nothing else trains
        model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    return model


def build_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    """Linear probing: MAE's LARS (or SGD) over the head. Fine-tuning: any optimizer over the layer-decay and
    no-weight-decay groups (the lr is set every step by the schedule, times each group's `lr_scale`)."""
    if args.linprobe:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = param_groups_layer_decay(model, args.weight_decay, args.layer_decay)
    if args.opt == "lars":
        return LARS(params, lr=args.blr, weight_decay=args.weight_decay)
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.blr, momentum=0.9, weight_decay=args.weight_decay)
    return adamw(params, args.blr, torch.device(args.device))


def build_criterion(args) -> nn.Module:
    if mixup_active(args):
        return SoftTargetCrossEntropy()  # mixup produces soft targets (smoothing included)
    return LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()


def build_datasets(args):
    """(training data, validation set); with --eval only the validation set is read (training data None)."""
    val = build_dataset(args.data_path, build_finetune_transform(False, args.input_size), split="val",
                        file_list=args.val_file_list, max_bad_fraction=args.max_bad_fraction)
    if args.eval:
        return None, val
    if args.linprobe:  # MAE: crop + flip only, so any data backend serves it
        train = build_train_data(args.data_backend, args.data_path, args.input_size, file_list=args.file_list,
                                 max_bad_fraction=args.max_bad_fraction, linprobe_crop=args.linprobe_crop)
    else:
        train_transform = build_finetune_transform(True, args.input_size, args.color_jitter, args.aa or None,
                                                   args.reprob, args.remode, args.recount)
        train = TrainData(build_dataset(args.data_path, train_transform, split="train", file_list=args.file_list,
                                        max_bad_fraction=args.max_bad_fraction))
    return train, val


def val_loader(args, env: DistEnv, dataset, stop_policy: StopPolicy = DEFAULT_POLICY) -> DataLoader:
    """Every sample exactly once: sharded across ranks with --dist_eval, else each rank sees all of it."""
    indices = range(env.rank, len(dataset), env.world_size) if args.dist_eval else range(len(dataset))
    return DataLoader(dataset, batch_size=args.batch_size, sampler=list(indices), num_workers=args.num_workers,
                      pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=False,
                      worker_init_fn=stop_policy.worker_init_fn)


def make_forward(mixup_fn: Optional[Mixup], criterion: nn.Module):
    def classification_forward(model, batch):
        samples, targets = batch
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        return criterion(model(samples), targets), {}
    return classification_forward


def main(args: argparse.Namespace, resumed: Optional[dict] = None, stop_policy: StopPolicy = DEFAULT_POLICY) -> None:
    """`resumed`: the --resume checkpoint already read by parse_args_and_checkpoint (else it is read here)."""
    env, device = setup(args)
    if args.data_path is None:
        raise SystemExit("--data_path is required (an ImageFolder root with train/ and val/)")
    logger.info("args: %s", json.dumps(vars(args), sort_keys=True))
    train_data, val_set = build_datasets(args)
    model = build_model(args).to(device)
    val = val_loader(args, env, val_set, stop_policy)
    if args.eval:
        if args.resume:
            ckpt = resumed if resumed is not None else checkpoint.load(args.resume)
            weights = eval_weights(ckpt, args.resume, "model_ema" if args.eval_ema else "model")
            ckpt.clear()  # the caller's reference too: nothing of the file is held while evaluating
            checkpoint.load_strict(model, weights, args.resume, "--" + ", --".join(ARCHITECTURE_ARGS))
            del weights
        stats = evaluate(model, val, device, args, distributed=args.dist_eval and env.enabled)
        logger.info("accuracy of the network on %d test images: top-1 %.2f%%, top-5 %.2f%%",
                    len(val_set), stats["acc1"], stats["acc5"])
        return

    warn_if_not_protocol_batch(args, env)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    best = {"max_accuracy": 0.0}
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=args.nb_classes) if mixup_active(args) else None

    def end_of_epoch(epoch: int, writer: TensorboardWriter) -> dict:
        stats = evaluate(model, val, device, args, distributed=args.dist_eval and env.enabled)
        record = {f"test_{k}": v for k, v in stats.items()}
        if ema is not None:
            record.update({f"test_ema_{k}": v for k, v in
                           evaluate(ema.module, val, device, args, args.dist_eval and env.enabled).items()})
        # The better of model and EMA this epoch (the model on a tie) competes for checkpoint-best.pth.
        source = "model_ema" if ema is not None and record["test_ema_acc1"] > stats["acc1"] else "model"
        acc1 = record["test_ema_acc1"] if source == "model_ema" else stats["acc1"]
        if acc1 > best["max_accuracy"]:
            best["max_accuracy"] = acc1
            if env.is_main:
                checkpoint.save_atomic(best_checkpoint(model, ema, source, acc1, epoch, record, args),
                                       os.path.join(args.output_dir, "checkpoint-best.pth"))
        writer.scalars({f"test/{k[5:]}": v for k, v in record.items()}, (epoch + 1) * 1000)
        logger.info("epoch %d: top-1 %.2f%% (best %.2f%%)%s", epoch, stats["acc1"], best["max_accuracy"],
                    f", EMA top-1 {record['test_ema_acc1']:.2f}%" if ema is not None else "")
        return {**record, "max_accuracy": best["max_accuracy"]}

    def extra_state() -> dict:
        return {"max_accuracy": best["max_accuracy"], **({"model_ema": ema.module.state_dict()} if ema else {})}

    def load_extra_state(ckpt: dict) -> None:
        best["max_accuracy"] = ckpt.get("max_accuracy", 0.0)
        if ema is not None and "model_ema" in ckpt:
            ema.module.load_state_dict(ckpt["model_ema"])

    task = Task(model=model, forward_fn=make_forward(mixup_fn, build_criterion(args)),
                dataset=PerSampleSeeded(train_data.dataset, args.seed), optimizer=build_optimizer(args, model),
                end_of_epoch=end_of_epoch, after_optimizer_step=(lambda: ema.update(model)) if ema else None,
                extra_state=extra_state, load_extra_state=load_extra_state,
                collate_fn=train_data.collate_fn, batch_to_device=train_data.batch_to_device)
    fit(args, env, device, task, stop_policy)


def best_checkpoint(model: nn.Module, ema: Optional[ModelEmaV3], source: str, acc1: float, epoch: int,
                    record: dict, args) -> dict:
    """checkpoint-best.pth: `model` holds the weights that scored the best top-1 (the EMA's when `best_source`
    is "model_ema"), so --eval, --finetune and MAE-style loaders all get them; `model_ema` holds the EMA."""
    best_weights = ema.module if source == "model_ema" else model
    state = {"model": best_weights.state_dict(), "best_source": source, "acc1": acc1, "epoch": epoch,
             "test_acc1": record["test_acc1"], "args": dict(vars(args))}
    if ema is not None:
        state.update(model_ema=ema.module.state_dict(), test_ema_acc1=record["test_ema_acc1"])
    return state


def eval_weights(ckpt: dict, path: str, key: str) -> dict:
    """The `model` or `model_ema` weights of checkpoint `ckpt` (read from `path`), for --eval."""
    if key not in ckpt:
        raise checkpoint.CheckpointError(f"{path} has no `{key}` weights (it holds {', '.join(sorted(ckpt))}); "
                                         f"EMA weights are saved by runs with --model_ema")
    return ckpt[key]


def warn_if_not_protocol_batch(args, env: DistEnv) -> None:
    """Linear probing's lr and BatchNorm depend on the effective batch; the published protocols use 16384."""
    eff_batch = args.batch_size * args.accum_iter * env.world_size
    if args.linprobe and eff_batch != LINPROBE_EFFECTIVE_BATCH:
        logger.warning("linear probing at an effective batch of %d (--batch_size %d x --accum_iter %d x %d GPUs); "
                       "MAE's and the release's protocols use %d: set --accum_iter to match",
                       eff_batch, args.batch_size, args.accum_iter, env.world_size, LINPROBE_EFFECTIVE_BATCH)


def run(argv: Optional[Sequence[str]] = None, stop_policy: StopPolicy = DEFAULT_POLICY) -> int:
    """Entry point with exit codes: 0 done, 1 non-finite loss / bad data, 143 stopped by a signal."""
    args, resumed = parse_args_and_checkpoint(argv)
    return run_main(functools.partial(main, resumed=resumed, stop_policy=stop_policy), args)


if __name__ == "__main__":
    sys.exit(run())
