"""What the embedded demo trains on, nothing downloaded: scikit-learn's bundled digits as an ImageFolder
(train/ 80%, val/ 20% held out) and a small ViT teacher trained on them with labels by main_finetune.py's
model, optimizer and loss. `main_pretrain.py --demo` and demo.py prepare them through `prepare_demo`;
docs/demo.md tells the whole story.
"""
import argparse
import json
import logging
import os
import random
from typing import Optional

import numpy as np
from PIL import Image
from torchvision import transforms

import main_finetune
from engine import Task, evaluate, fit, setup
from util import checkpoint
from util.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_dataset, build_finetune_transform
from util.recipes import DEMO_IMAGE_SIZE, DEMO_TEACHER, DEMO_TEACHER_ARCH, DEMO_TEACHER_TIMM
from util.sampler import PerSampleSeeded

logger = logging.getLogger("maskalign")

DEMO_DATASET = "scikit-learn load_digits (1797 8x8 digit images, 10 classes), upsampled to 32x32"
VAL_FRACTION = 0.2
TEACHER_EPOCHS = 30


def kwargs_argv(kwargs: dict) -> list[str]:
    """{k: v} -> ["k=v", ...] for --model_kwargs / --teacher_kwargs."""
    return [f"{k}={v}" for k, v in kwargs.items()]


def count_images(data: str, split: str) -> int:
    """Files under data/split (the demo's ImageFolder holds only images)."""
    return sum(len(files) for _, _, files in os.walk(os.path.join(data, split)))


def fitting_batch(batch_size: int, data: str) -> int:
    """The recipe's batch, or half the training set when --per_class makes it smaller than one batch."""
    return max(1, min(batch_size, count_images(data, "train") // 2))


def prepare_demo_data(root: str, seed: int = 0, per_class: Optional[int] = None) -> str:
    """Write the digits as an ImageFolder root/{train,val}/<digit>/*.png (once); returns root.
    `per_class` keeps at most that many images per class in each split (quick checks and tests)."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    rng = random.Random(seed)
    for label in range(10):
        indices = [i for i, t in enumerate(digits.target) if t == label]
        rng.shuffle(indices)
        n_val = round(len(indices) * VAL_FRACTION)
        splits = {"val": indices[:n_val], "train": indices[n_val:]}
        for split, chosen in splits.items():
            for index in chosen[:per_class]:
                folder = os.path.join(root, split, str(label))
                os.makedirs(folder, exist_ok=True)
                img = Image.fromarray(images[index]).resize((DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), Image.BICUBIC)
                img.convert("RGB").save(os.path.join(folder, f"{index:04d}.png"))
    open(done, "w").close()
    logger.info("demo data: %s in %s (train/ and val/)", DEMO_DATASET, root)
    return root


def teacher_finetune_argv(data_path: str, output_dir: str, epochs: int = TEACHER_EPOCHS) -> list[str]:
    """main_finetune.py flags of the demo teacher: trained from scratch with labels (train split only)."""
    return ["--model", DEMO_TEACHER_TIMM, "--model_kwargs", *kwargs_argv(DEMO_TEACHER_ARCH), "--cls_token",
            "--nb_classes", "10", "--input_size", str(DEMO_IMAGE_SIZE), "--data_path", data_path,
            "--output_dir", output_dir, "--epochs", str(epochs), "--warmup_epochs", "2",
            "--batch_size", str(fitting_batch(32, data_path)),
            "--blr", "8e-3", "--layer_decay", "1.0", "--drop_path", "0.0", "--weight_decay", "0.05",
            "--mixup", "0", "--cutmix", "0", "--smoothing", "0.1",
            "--num_workers", "0", "--device", "cpu", "--save_freq", "1000", "--print_freq", "1000"]


def digit_train_transform() -> transforms.Compose:
    """Mild crops, no flips: ImageNet's crop scale (0.08, 1) would leave a fragment of an 8x8 digit."""
    return transforms.Compose([
        transforms.RandomResizedCrop(DEMO_IMAGE_SIZE, scale=(0.7, 1.0), ratio=(0.9, 1.1),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def train_demo_teacher(data_path: str, output_dir: str, epochs: int = TEACHER_EPOCHS) -> None:
    """main_finetune's model, optimizer, loss and the shared engine, with digit-sized augmentation."""
    args = main_finetune.parse_args(teacher_finetune_argv(data_path, output_dir, epochs))
    env, device = setup(args)
    train = build_dataset(data_path, digit_train_transform(), split="train")
    val = main_finetune.val_loader(args, env, build_dataset(data_path, build_finetune_transform(False, DEMO_IMAGE_SIZE),
                                                            split="val"))
    model = main_finetune.build_model(args).to(device)

    def end_of_epoch(epoch: int, writer) -> dict:
        return {f"test_{k}": v for k, v in evaluate(model, val, device, args).items()}

    forward = main_finetune.make_forward(None, main_finetune.build_criterion(args))
    fit(args, env, device, Task(model=model, forward_fn=forward, dataset=PerSampleSeeded(train, args.seed),
                                optimizer=main_finetune.build_optimizer(args, model), end_of_epoch=end_of_epoch))


def prepare_demo_teacher(path: str, data_path: str, epochs: Optional[int] = None) -> str:
    """Train the demo teacher with labels (once; an interrupted run resumes) and save its weights to `path`."""
    if os.path.exists(path):
        return path
    work_dir = os.path.splitext(path)[0]
    train_demo_teacher(data_path, work_dir, epochs or TEACHER_EPOCHS)
    state = checkpoint.load(os.path.join(work_dir, checkpoint.LATEST))["model"]
    checkpoint.save_atomic(state, path)
    logger.info("demo teacher: top-1 %.1f%% on the held-out digits; weights in %s",
                last_test_accuracy(work_dir), path)
    return path


def last_test_accuracy(output_dir: str) -> Optional[float]:
    """top-1 of the last epoch in a main_finetune run's log.txt (None if it has no evaluation yet)."""
    log = os.path.join(output_dir, "log.txt")
    if not os.path.exists(log):
        return None
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[-1].get("test_acc1") if records else None


def prepare_demo(args: argparse.Namespace, dry: bool = False) -> None:
    """What `main_pretrain.py --demo` leaves open: the digits and, for the demo teacher, its trained weights
    (made once under --output_dir; `dry` only fills in the paths, for the ranks that do not make them)."""
    if args.data_path is None:
        args.data_path = os.path.join(args.output_dir, "demo_data")
        if not dry:
            prepare_demo_data(args.data_path, args.seed)
    if args.teacher_weights is None and args.teacher == DEMO_TEACHER:
        args.teacher_weights = os.path.join(args.output_dir, "demo_teacher.pth")
        if not dry:
            prepare_demo_teacher(args.teacher_weights, args.data_path)
