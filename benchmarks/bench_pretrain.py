"""Throughput of one MaskAlign pre-training step, and where its time goes.

    python benchmarks/bench_pretrain.py --device cuda --batch_size 128            # ViT-B/16 student, CLIP-B/16 teacher
    python benchmarks/bench_pretrain.py --device cpu --batch_size 4 --steps 3     # smoke run

Prints, per configuration: ms per step (teacher forward + student forward/backward + AdamW), images/s,
the teacher's share of the step, and peak GPU memory. Teachers use random weights (same cost as real ones).
`mask_ratio 0.0` is feature distillation (the student sees every token), the paper's FD baseline.
"""
import os
import sys
import time
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models_maskalign  # noqa: E402
from util.args import new_parser  # noqa: E402
from util.optim import param_groups_weight_decay  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Mean seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def bench(args, mask_ratio: float, mask_type: str) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models_maskalign.__dict__[args.model](teacher=args.teacher, teacher_weights="random",
                                                  mask_ratio=mask_ratio, mask_type=mask_type,
                                                  drop_path_rate=0.1).to(device)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    imgs = torch.randn(args.batch_size, 3, 224, 224, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def step():
        with amp:
            loss = model(imgs)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_only():
        with amp, torch.no_grad():
            model.teacher(imgs, model.target_levels, need_cls_attention=mask_type == "attentive")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(step, device, args.steps, args.warmup)
    teacher_s = timed(teacher_only, device, args.steps, args.warmup)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return dict(step_ms=1000 * step_s, img_s=args.batch_size / step_s, teacher_share=teacher_s / step_s,
                peak_gib=peak)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="maskalign_vit_base_patch16")
    parser.add_argument("--teacher", default="openai/clip-vit-base-patch16")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--amp", choices=("bf16", "none"), default=None)
    args = parser.parse_args(argv)
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{args.model} + {args.teacher}, batch {args.batch_size}, amp {args.amp}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"{'config':<28}{'ms/step':>10}{'img/s':>10}{'teacher':>10}{'peak GiB':>10}")
    results = {}
    for mask_ratio, mask_type in ((0.7, "attentive"), (0.7, "random"), (0.0, "random")):
        name = f"mask {mask_ratio} {mask_type}" + (" (FD)" if mask_ratio == 0 else "")
        r = results[name] = bench(args, mask_ratio, mask_type)
        print(f"{name:<28}{r['step_ms']:>10.1f}{r['img_s']:>10.1f}{r['teacher_share']:>10.0%}{r['peak_gib']:>10.2f}")
    fd, ours = results["mask 0.0 random (FD)"], results["mask 0.7 attentive"]
    print(f"MaskAlign step is {fd['step_ms'] / ours['step_ms']:.2f}x faster than feature distillation (mask 0)")


if __name__ == "__main__":
    main()
