"""`make demo`: what MaskAlign learns, measured on CPU in a few minutes, nothing downloaded.

    python demo.py --output_dir demo_output

1. data      scikit-learn's bundled digits as an ImageFolder (train/ 80%, val/ 20% held out), demo_inputs.py
2. teacher   a small ViT trained with labels on train/ (main_finetune's model and loss, the shared engine)
3. pre-train the same student three ways with equal epochs, batch and schedule (main_pretrain.py --demo):
               maskalign             attentive masking at 0.75 (4 of 16 patches visible), Dynamic Alignment
               feature_distillation  the same with mask ratio 0 (the student sees every patch)
               scratch               no pre-training: the student's initial weights
4. evaluate  each student frozen: linear probe (main_finetune.py --linprobe) and k-NN (util/knn.py) on val/
5. pictures  visualize.py on the MaskAlign checkpoint and a few held-out digits
6. report    a table on stdout, report.md and report.json in --output_dir

Every stage keeps its result under --output_dir: a rerun continues where the last one stopped, and a finished
demo prints its report and says how to start over.
"""
import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Optional

import timm
import torch
from torch.utils.data import DataLoader

import main_finetune
import main_pretrain
import visualize
from demo_inputs import (
    DEMO_DATASET,
    count_images,
    fitting_batch,
    kwargs_argv,
    last_test_accuracy,
    prepare_demo_data,
    prepare_demo_teacher,
)
from util import args as cli
from util import checkpoint
from util.data import build_dataset, build_finetune_transform
from util.knn import knn_top1
from util.metrics import setup_logging
from util.pretrained import load_into, read_backbone
from util.recipes import DEMO_IMAGE_SIZE, DEMO_STUDENT_ARCH, DEMO_TEACHER_ARCH, RECIPES

logger = logging.getLogger("maskalign")

METHODS = ("maskalign", "feature_distillation", "scratch")
DEMO_MASK_RATIO = 0.75
KNN_K = 20
PRETRAIN = RECIPES["pretrain_demo"].flags  # main_pretrain.py --demo


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("MaskAlign demo: MaskAlign vs feature distillation vs no pre-training on digits")
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the --demo preset's)")
    parser.add_argument("--teacher_epochs", type=int, default=None, help="default: demo_inputs.py TEACHER_EPOCHS")
    parser.add_argument("--probe_epochs", type=int, default=15, help="linear-probe epochs")
    parser.add_argument("--per_class", type=int, default=None,
                        help="use at most this many images per class and split (quick checks; default: all)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ----------------------------------------------------------------------------- stages

def _stage_result(path: str) -> Optional[dict]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _write_json(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def pretrain_argv(method: str, run_dir: str, data: str, teacher: str, args: argparse.Namespace) -> list[str]:
    argv = ["--demo", "--output_dir", run_dir, "--data_path", data, "--teacher_weights", teacher,
            "--mask_ratio", str(DEMO_MASK_RATIO if method == "maskalign" else 0.0), "--seed", str(args.seed),
            "--batch_size", str(fitting_batch(PRETRAIN["batch_size"], data))]
    return argv + (["--epochs", str(args.epochs)] if args.epochs else [])


def pretrain(method: str, run_dir: str, data: str, teacher: str, args: argparse.Namespace) -> dict:
    """Pre-train one student (or, for scratch, write its initial weights); returns the stage's result."""
    done = _stage_result(os.path.join(run_dir, "pretrain.json"))
    if done:
        return done
    os.makedirs(run_dir, exist_ok=True)
    run_args = main_pretrain.parse_args(pretrain_argv(method, run_dir, data, teacher, args))
    start = time.time()
    if method == "scratch":  # the weights both pre-training runs start from (same seed, same constructor)
        torch.manual_seed(run_args.seed)
        model = main_pretrain.build_model(run_args)
        ckpt = os.path.join(run_dir, "checkpoint-init.pth")
        checkpoint.save_atomic({"model": model.state_dict(), "args": dict(vars(run_args))}, ckpt)
        seconds = 0.0
    else:
        resumed = os.path.exists(os.path.join(run_dir, checkpoint.LATEST))
        code = main_pretrain.run(pretrain_argv(method, run_dir, data, teacher, args))
        if code != 0:
            raise SystemExit(f"pre-training {method} stopped with exit code {code}; rerun `make demo` to continue")
        ckpt = os.path.join(run_dir, checkpoint.LATEST)
        seconds = time.time() - start
        if resumed:
            logger.warning("%s was resumed: pretrain_seconds counts only this session's part", method)
    result = {"checkpoint": ckpt, "pretrain_seconds": round(seconds, 1), "epochs": 0 if method == "scratch"
              else run_args.epochs, "mask_ratio": None if method == "scratch" else run_args.mask_ratio}
    _write_json(result, os.path.join(run_dir, "pretrain.json"))
    return result


def linprobe_argv(ckpt: str, out: str, data: str, epochs: int, seed: int) -> list[str]:
    """main_finetune.py --linprobe (frozen backbone, BatchNorm + linear head, random resized crop + flip) with
    SGD at batch 64: MAE's LARS needs thousands of steps to grow the head from its 0.01 init, and 1438 images
    give a few hundred. The README's table was measured with torchvision's crop."""
    return ["--linprobe", "--finetune", ckpt, "--model", "vit_tiny_patch16_224",
            "--model_kwargs", *kwargs_argv(DEMO_STUDENT_ARCH), "--nb_classes", "10",
            "--input_size", str(DEMO_IMAGE_SIZE),
            "--data_path", data, "--output_dir", out, "--epochs", str(epochs), "--warmup_epochs", "1",
            "--opt", "sgd", "--blr", "1.0", "--batch_size", str(fitting_batch(64, data)), "--accum_iter", "1",
            "--linprobe_crop", "torchvision", "--num_workers", "0", "--device", "cpu", "--save_freq", "1000",
            "--print_freq", "1000", "--seed", str(seed)]


def evaluate_student(method: str, run_dir: str, ckpt: str, data: str, args: argparse.Namespace) -> dict:
    """Linear probe (last epoch's held-out top-1) and k-NN top-1 of the frozen student."""
    done = _stage_result(os.path.join(run_dir, "eval.json"))
    if done:
        return done
    probe_dir = os.path.join(run_dir, "linprobe")
    code = main_finetune.run(linprobe_argv(ckpt, probe_dir, data, args.probe_epochs, args.seed))
    if code != 0:
        raise SystemExit(f"the linear probe of {method} stopped with exit code {code}; rerun `make demo`")
    result = {"linear_probe_top1": round(last_test_accuracy(probe_dir), 2),
              "knn_top1": round(knn_accuracy(ckpt, data), 2)}
    _write_json(result, os.path.join(run_dir, "eval.json"))
    return result


def knn_accuracy(ckpt: str, data: str) -> float:
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token", img_size=DEMO_IMAGE_SIZE,
                                 **DEMO_STUDENT_ARCH)
    load_into(backbone, read_backbone(ckpt))
    transform = build_finetune_transform(False, DEMO_IMAGE_SIZE)
    loaders = [DataLoader(build_dataset(data, transform, split=split), batch_size=256) for split in ("train", "val")]
    return knn_top1(backbone, *loaders, torch.device("cpu"), k=KNN_K)


def pictures(run_dir: str, ckpt: str, data: str, out: str) -> list[str]:
    val = os.path.join(data, "val")
    files = [os.path.join(val, d, sorted(os.listdir(os.path.join(val, d)))[0]) for d in ("0", "3", "5", "7")]
    return visualize.main(["--checkpoint", ckpt, "--images", *files, "--output_dir", out,
                           "--log", os.path.join(run_dir, "log.txt")])


# ----------------------------------------------------------------------------- report

def report_markdown(report: dict) -> str:
    rows = [f"| {name} | {m['linear_probe_top1']:.1f} | {m['knn_top1']:.1f} | {m['pretrain_seconds']:.0f} |"
            for name, m in report["methods"].items()]
    teacher = report["teacher"]
    return "\n".join([
        f"Dataset: {report['dataset']}; {report['train_images']} train / {report['val_images']} held-out images.",
        f"Teacher: {teacher['description']}, held-out top-1 {teacher['val_top1']:.1f}%.",
        f"Budget: {report['budget_rule']}.",
        "",
        "| method | linear probe top-1 (%) | k-NN top-1 (%) | pre-training (s) |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        f"{report['machine']}; {report['total_seconds']:.0f} s"
        + (" in the last invocation (it reused stages an earlier one finished)." if report["continued"] else "."),
    ]) + "\n"


def build_report(results: dict, data: str, args: argparse.Namespace, teacher_dir: str, total: float,
                 continued: bool) -> dict:
    epochs = args.epochs or PRETRAIN["epochs"]
    count = {s: count_images(data, s) for s in ("train", "val")}
    return {
        "dataset": DEMO_DATASET,
        "train_images": count["train"], "val_images": count["val"],
        "budget_rule": f"equal epochs: {epochs} pre-training epochs each, same batch size, lr schedule and seed "
                       f"(scratch: none); times differ because the masked student sees "
                       f"{int(round((1 - DEMO_MASK_RATIO) * 100))}% of the patches",
        "teacher": {"description": f"ViT ({DEMO_TEACHER_ARCH['depth']} blocks, width "
                                   f"{DEMO_TEACHER_ARCH['embed_dim']}) trained "
                                   f"with labels on the train split", "val_top1": last_test_accuracy(teacher_dir)},
        "evaluation": f"frozen student: linear probe {args.probe_epochs} epochs (main_finetune.py --linprobe), "
                      f"weighted {KNN_K}-NN on [CLS] features; top-1 on the held-out split",
        "methods": {m: {"linear_probe_top1": results[m]["linear_probe_top1"], "knn_top1": results[m]["knn_top1"],
                        "pretrain_seconds": results[m]["pretrain_seconds"], "epochs": results[m]["epochs"],
                        "mask_ratio": results[m]["mask_ratio"]} for m in METHODS},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "total_seconds": round(total, 1),
        "continued": continued,
    }


def print_finished(out: str) -> None:
    with open(os.path.join(out, "report.md")) as f:
        print(f.read())
    print(f"The demo in {out} is complete (report above, pictures in {os.path.join(out, 'pictures')}).\n"
          f"To run it again from the start: rm -rf {out} (or `make clean`), then `make demo`.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging(True)
    out = args.output_dir
    if os.path.exists(os.path.join(out, "report.json")):
        print_finished(out)
        return 0
    start = time.time()
    continued = os.path.exists(os.path.join(out, "data"))
    data = prepare_demo_data(os.path.join(out, "data"), args.seed, args.per_class)
    teacher = prepare_demo_teacher(os.path.join(out, "teacher.pth"), data, args.teacher_epochs)
    results = {}
    for method in METHODS:
        run_dir = os.path.join(out, method)
        results[method] = pretrain(method, run_dir, data, teacher, args)
        results[method].update(evaluate_student(method, run_dir, results[method]["checkpoint"], data, args))
    pictures(os.path.join(out, "maskalign"), results["maskalign"]["checkpoint"], data, os.path.join(out, "pictures"))
    report = build_report(results, data, args, os.path.join(out, "teacher"), time.time() - start, continued)
    _write_json(report, os.path.join(out, "report.json"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(report))
    print_finished(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
