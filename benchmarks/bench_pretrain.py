"""Speed of a MaskAlign pre-training step: img/s, MFU, the real loop, feature distillation, eager vs compiled,
and the reference MaskAlign code side by side.

    python benchmarks/bench_pretrain.py                                  # GPU: ViT-B/16 + CLIP-B/16, bf16, batch 128
    python benchmarks/bench_pretrain.py --compile --loop --ref .ref/maskalign     # every figure of the README
    python benchmarks/bench_pretrain.py --device cpu --amp none --batch_size 8 --ref DIR --rounds 5   # CPU figure

Per setting it prints ms per step, img/s, achieved TFLOP/s, MFU and peak GPU memory. A *step* is the
teacher forward, student forward/backward and the optimizer update, on one fixed in-memory batch; the *loop*
is the same model trained through `engine.fit` (lr schedule, signal vote, loss check, logging, checkpoint
timer, DataLoader of synthetic in-memory images, fp32 host->device copies), timed after its warm-up steps.
FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one eager step (matmuls, convolutions and
attention; elementwise work is not counted); MFU divides them by the card's dense bf16/fp16 peak (TF32 peak,
half of it, for --amp none), from a small table or --peak_tflops. Teachers use random weights (same cost).

--ref DIR times the reference code (github.com/OpenDriveLab/maskalign, extracted to DIR) in the same process:
its model with the paper's config and its training recipe (AdamW, fp16 autocast + GradScaler on GPU, float32
on CPU, and on both the gradient norm its loss scaler computes). Only --ref needs `transformers` (the reference's
teacher is a Hugging Face CLIPVisionModel); nothing else here does. Newer libraries renamed a few things the
reference relies on; the loader adapts them without changing what it computes. With --ref, ours runs the
reference's alignment form (`--align official`: mix the student levels, then one adaptor per target level) so
that both sides compute the same model; our default, the paper's eq. 1 (`dynamic`, one adaptor per student
block), costs 1.4 GFLOP more per image.

--rounds R > 1 alternates the settings R times, every other round in reverse order, and reports medians (for a
machine shared with other work). The reference is timed next to ours in every round, and the ratio is also given
per round (median and range), which cancels a shared machine's slow drifts. With --rounds 1 each setting runs
alone and is freed before the next, so its peak memory is its own.
"""
import argparse
import gc
import importlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import main_pretrain  # noqa: E402
import models_maskalign  # noqa: E402
from maskalign.alignment import ALIGN_FORMS  # noqa: E402
from util.args import ParseKwargs, new_parser  # noqa: E402
from util.compile import CompileWatch, compile_in_place  # noqa: E402
from util.data import TrainData  # noqa: E402
from util.distributed import DistEnv  # noqa: E402
from util.optim import adamw, param_groups_weight_decay  # noqa: E402

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s; TF32 is half of these.
PEAK_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def card_peak_tflops(device: torch.device, amp: str, override: Optional[float]) -> Optional[float]:
    """The dense peak for `amp` on this card (None when unknown, e.g. on CPU without --peak_tflops)."""
    if override is not None:
        peak = override
    elif device.type != "cuda":
        return None
    else:
        name = torch.cuda.get_device_name(device)
        if "H200" in name:
            peak = PEAK_TFLOPS["H200"]
        elif "H100" in name:
            peak = PEAK_TFLOPS["H100 PCIe" if "PCIe" in name else "H100 SXM"]
        elif "A100" in name:
            peak = PEAK_TFLOPS["A100"]
        else:
            return None
    return peak if amp != "none" else peak / 2


# --------------------------------------------------------------------------------------------- settings
@dataclass
class Setting:
    """One thing to time: a step closure, its FLOPs per step and what to print next to it."""
    name: str
    amp: str
    step: Callable[[], None]
    flops: float
    watch: Optional[CompileWatch] = None
    times: list[float] = field(default_factory=list)  # seconds per step, one entry per timed block
    peak_gib: float = float("nan")
    loop_img_s: Optional[float] = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of `step` (CPU attention kernels are counted with torch's own SDPA formulas). The fused
    CPU inference path of nn.MultiheadAttention, whose inner matmuls the counter cannot see, is switched off for
    any model that holds one (our teachers compute their blocks without it)."""
    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            step()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return float(counter.get_total_flops())


def build_ours(args, device: torch.device, mask_ratio: float, amp: str, compiled: bool) -> tuple[Callable, float]:
    """(step, FLOPs per step) of our model as the training loop runs it: fused AdamW, the teacher's weights in
    the autocast dtype, fp16 with a grad scaler, the loop's guarded update. FLOPs are counted eagerly."""
    torch.manual_seed(0)
    model = models_maskalign.__dict__[args.model](
        teacher=args.teacher, teacher_weights="random", mask_ratio=mask_ratio, align=args.align, drop_path_rate=0.1,
        **args.model_kwargs).to(device)
    model.teacher.set_compute_dtype(AMP_DTYPES[amp])
    optimizer = adamw(param_groups_weight_decay(model, 0.05), 1e-4, device, betas=(0.9, 0.95))
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = SimpleNamespace(scaler=torch.amp.GradScaler(device.type) if amp == "fp16" else None,
                          args=SimpleNamespace(clip_grad=None))
    loop_args = SimpleNamespace(amp=amp)

    def make_step(images: torch.Tensor, update: bool = True) -> Callable[[], None]:
        def step() -> None:
            with engine.autocast(loop_args, device):  # the loop's forward: a compiled graph serves both
                loss = main_pretrain.pretrain_forward(model, [images])[0]
            (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
            if update:
                engine._apply_update(optimizer, ctx, engine._gradient_norm(optimizer, params, ctx))
            else:
                optimizer.zero_grad(set_to_none=True)
        return step

    flops = count_flops(make_step(torch.randn(2, 3, args.input_size, args.input_size, device=device), update=False))
    if compiled:
        compile_in_place(model)
    step = make_step(torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device))
    return step, flops * args.batch_size / 2


def load_reference(ref_dir: str):
    """The reference code's models_pretrain module, adapted to today's libraries: timm's Block no longer takes
    `qk_scale`, numpy dropped `np.float`, and its teacher (`CLIPVisionModel.from_pretrained`) is built with
    random weights of the same shape, with eager attention (it asks for the attention maps)."""
    import numpy as np
    import timm.models.vision_transformer as tvt
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not os.path.isfile(os.path.join(ref_dir, "models_pretrain.py")):
        raise SystemExit(f"--ref {ref_dir}: no models_pretrain.py there; extract github.com/OpenDriveLab/maskalign")
    if not hasattr(np, "float"):
        np.float = float
    timm_block = tvt.Block

    class BlockWithQkScale(timm_block):
        def __init__(self, *a, qk_scale=None, **kw):
            super().__init__(*a, **kw)

    def random_clip(name: str, **_):
        large = "large" in name
        config = CLIPVisionConfig(hidden_size=1024 if large else 768, intermediate_size=4096 if large else 3072,
                                  num_hidden_layers=24 if large else 12, num_attention_heads=16 if large else 12,
                                  patch_size=14 if large else 16, image_size=224)
        config._attn_implementation = "eager"
        return CLIPVisionModel(config)

    tvt.Block = BlockWithQkScale
    sys.path.insert(0, ref_dir)
    try:
        module = importlib.import_module("models_pretrain")
    finally:
        tvt.Block = timm_block
        sys.path.remove(ref_dir)
    module.CLIPVisionModel = SimpleNamespace(from_pretrained=random_clip)
    return module


def build_reference(args, device: torch.device, amp: str) -> tuple[Callable, float]:
    """The reference step as its engine_pretrain.py runs it: autocast, its loss scaler (scale, backward,
    unscale, step, update) on GPU, the gradient norm that scaler computes on every device, AdamW with its
    weight-decay groups."""
    reference = load_reference(args.ref)
    torch.manual_seed(0)
    model = reference.mae_vit_base_patch16(
        drop_path_rate=0.1, loss_weights="top5", loss_type="smoothl1", mask_type="attention", fusion_type="linear",
        target_norm="whiten", head_type="linear", teacher_model="openai/clip-vit-base-patch16").to(device).train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
                                  lr=1e-4, betas=(0.9, 0.95))
    params = decay + no_decay
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    dtype = AMP_DTYPES[amp]

    def make_step(images: torch.Tensor, update: bool = True) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(images, mask_ratio=0.7)
            (scaler.scale(loss) if scaler else loss).backward()
            if update:  # its loss scaler: unscale, the gradient norm (computed on every device), step, update
                if scaler:
                    scaler.unscale_(optimizer)
                torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]))
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    flops = count_flops(make_step(torch.randn(2, 3, 224, 224, device=device), update=False))
    return make_step(torch.randn(args.batch_size, 3, 224, 224, device=device)), flops * args.batch_size / 2


def make_setting(args, device, name: str, amp: str, build: Callable[[], tuple[Callable, float]],
                 compiled: bool) -> Setting:
    step, flops = build()
    setting = Setting(name, amp, step, flops, CompileWatch() if compiled else None)
    start = time.perf_counter()
    for _ in range(args.warmup):  # compiles here, when compiled
        step()
    sync(device)
    if setting.watch is not None:
        setting.watch.mark_warm()
    print(f"  built and warmed up {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return setting


def time_block(setting: Setting, device: torch.device, steps: int) -> None:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        setting.step()
    sync(device)
    setting.times.append((time.perf_counter() - start) / steps)


# ------------------------------------------------------------------------------------------------ the loop
class SyntheticImages(torch.utils.data.Dataset):
    """`n` ImageNet-normalised float32 images held in memory (a fixed pool of 16, so memory stays small)."""
    num_bad = 0

    def __init__(self, n: int, size: int) -> None:
        self.n = n
        self.pool = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.pool[index % 16].clone(), 0


def loop_img_s(args, device: torch.device, mask_ratio: float, amp: str, compiled: bool) -> float:
    """img/s of `engine.fit` (one epoch of warmup + rounds * steps steps) after its warm-up steps."""
    steps = args.rounds * args.steps
    with tempfile.TemporaryDirectory() as out:
        flags = ["--model", args.model, "--teacher", args.teacher, "--teacher_weights", "random",
                 "--batch_size", str(args.batch_size), "--epochs", "1", "--amp", amp, "--device", device.type,
                 "--output_dir", out, "--num_workers", str(args.num_workers), "--mask_ratio", str(mask_ratio),
                 "--input_size", str(args.input_size), "--align", args.align, "--print_freq", "20",
                 "--save_freq", "1000"]
        flags += ["--compile"] if compiled else []
        flags += ["--model_kwargs", *[f"{k}={v}" for k, v in args.model_kwargs.items()]] if args.model_kwargs else []
        loop_args = main_pretrain.parse_args(flags)
        env, _ = engine.setup(loop_args)
        model = main_pretrain.build_model(loop_args).to(device)
        images = SyntheticImages((args.warmup + steps) * args.batch_size, args.input_size)
        task = main_pretrain.make_task(loop_args, model, TrainData(images), device)
        clock = {}
        forward = task.forward_fn

        def timed_forward(m, batch):
            clock["calls"] = clock.get("calls", 0) + 1
            if clock["calls"] == args.warmup + 1:
                sync(device)
                clock["start"] = time.perf_counter()
            return forward(m, batch)

        def end_of_epoch(epoch, writer):
            sync(device)
            clock["end"] = time.perf_counter()
            return {}

        task.forward_fn, task.end_of_epoch = timed_forward, end_of_epoch
        engine.fit(loop_args, DistEnv(), device, task)
    return steps * args.batch_size / (clock["end"] - clock["start"])


# ------------------------------------------------------------------------------------------------- report
def print_report(args, device: torch.device, settings: list[Setting]) -> None:
    print(f"\n{'setting':<34}{'ms/step':>9}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'loop img/s':>12}")
    by_name = {}
    for s in settings:
        step_s = statistics.median(s.times)
        by_name[s.name] = step_s
        tflops = s.flops / step_s / 1e12
        peak = card_peak_tflops(device, s.amp, args.peak_tflops)
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        loop = f"{s.loop_img_s:.1f}" if s.loop_img_s else ""
        print(f"{s.name:<34}{1000 * step_s:>9.1f}{args.batch_size / step_s:>9.1f}{tflops:>9.1f}{mfu:>7}"
              f"{s.peak_gib:>10.2f}{loop:>12}")
    print()
    for s in settings:
        print(f"{s.name}: {s.flops / args.batch_size / 1e9:.1f} GFLOP per image counted"
              + (f"; {s.watch.summary()}" if s.watch else ""))
        if s.loop_img_s:
            print(f"  loop / bare step img/s: {s.loop_img_s * by_name[s.name] / args.batch_size:.2f}")
    ours = [s for s in settings if s.name.startswith("ours") and "FD" not in s.name]
    best = min(ours, key=lambda s: by_name[s.name])
    for s in settings:
        if "FD" in s.name:
            same = s.name.replace("FD", "MaskAlign")
            if same in by_name:
                print(f"MaskAlign / FD step time ({s.name[5:]}): {by_name[same] / by_name[s.name]:.2f}")
    for ref in (s for s in settings if s.name.startswith("reference")):
        print(f"ours best ({best.name}) / reference step time: {step_ratio(best, ref)}"
              f"  (img/s {by_name[ref.name] / by_name[best.name]:.2f}x)")
        same = [s for s in ours if s.amp == ref.amp and s.watch is None]
        if same:
            print(f"ours same precision ({same[0].name}) / reference step time: {step_ratio(same[0], ref)}")


def step_ratio(ours: Setting, ref: Setting) -> str:
    """ours / ref step time as the ratio of the medians; with several rounds also the median and range of the
    per-round ratios, which pair blocks timed back to back and so cancel a shared machine's slow drifts."""
    text = f"{statistics.median(ours.times) / statistics.median(ref.times):.2f}"
    if len(ours.times) > 1 and len(ours.times) == len(ref.times):
        per_round = sorted(o / r for o, r in zip(ours.times, ref.times))
        text += (f"; per round: median {statistics.median(per_round):.2f}, "
                 f"range {per_round[0]:.2f}-{per_round[-1]:.2f}")
    return text


def plan(args) -> list[tuple[str, str, Callable[[], tuple[Callable, float]], bool, Optional[float]]]:
    """(name, amp, builder, compiled, loop mask ratio or None) for every setting asked for."""
    device = torch.device(args.device)
    loop_ratio = args.mask_ratio if args.loop else None

    def ours(mask_ratio: float, amp: str, compiled: bool) -> Callable[[], tuple[Callable, float]]:
        return lambda: build_ours(args, device, mask_ratio, amp, compiled)

    settings = [(f"ours MaskAlign {args.amp} eager", args.amp, ours(args.mask_ratio, args.amp, False), False,
                 loop_ratio)]
    if args.ref:  # between ours in its precision and ours compiled: each ratio pairs blocks timed back to back
        ref_amp = args.ref_amp or ("fp16" if device.type == "cuda" else "none")
        if ref_amp != args.amp:
            settings.append((f"ours MaskAlign {ref_amp} eager", ref_amp, ours(args.mask_ratio, ref_amp, False),
                             False, None))
        settings.append((f"reference {ref_amp}" + (" + GradScaler" if ref_amp == "fp16" else ""), ref_amp,
                         lambda: build_reference(args, device, ref_amp), False, None))
    if args.compile:
        settings.append((f"ours MaskAlign {args.amp} compiled", args.amp, ours(args.mask_ratio, args.amp, True),
                         True, loop_ratio))
    settings.append((f"ours FD {args.amp} eager", args.amp, ours(0.0, args.amp, False), False, None))
    if args.compile and args.compile_fd:
        settings.append((f"ours FD {args.amp} compiled", args.amp, ours(0.0, args.amp, True), True, None))
    return settings


def run(args) -> None:
    device = torch.device(args.device)
    engine.configure_backends(device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"peak {card_peak_tflops(device, args.amp, args.peak_tflops)} TFLOP/s ({args.amp})")
    else:
        print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{args.model} + {args.teacher}, batch {args.batch_size}, mask {args.mask_ratio} attentive, "
          f"align {args.align}, {args.warmup} warm-up steps, {args.rounds} round(s) of {args.steps} timed steps",
          flush=True)
    quiet = logging.getLogger("maskalign")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the models' and the loop's INFO lines would bury the figures
    try:
        print_report(args, device, time_settings(args, device))
    finally:
        quiet.setLevel(level)


def time_settings(args, device: torch.device) -> list[Setting]:
    planned = plan(args)
    settings = []
    if args.rounds == 1:  # one at a time: each peak memory figure is the setting's own
        for name, amp, build, compiled, loop_ratio in planned:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            setting = make_setting(args, device, name, amp, build, compiled)
            time_block(setting, device, args.steps)
            if device.type == "cuda":
                setting.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
            setting.step = None  # frees the model before the next setting
            settings.append(setting)
            gc.collect()
            print(f"  {name}: {1000 * setting.times[0]:.1f} ms/step, {args.batch_size / setting.times[0]:.1f} img/s",
                  flush=True)
            if loop_ratio is not None:
                setting.loop_img_s = loop_img_s(args, device, loop_ratio, amp, compiled)
                print(f"  {name} through engine.fit: {setting.loop_img_s:.1f} img/s", flush=True)
    else:  # alternate, for a machine shared with other work
        settings = [make_setting(args, device, name, amp, build, compiled) for name, amp, build, compiled, _ in planned]
        for round_index in range(args.rounds):  # every other round backwards: each pair runs in both orders
            for setting in settings if round_index % 2 == 0 else reversed(settings):
                time_block(setting, device, args.steps)
        for setting, (_, amp, _, compiled, loop_ratio) in zip(settings, planned):
            if loop_ratio is not None:
                setting.loop_img_s = loop_img_s(args, device, loop_ratio, amp, compiled)
    return settings


def get_args_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="maskalign_vit_base_patch16")
    parser.add_argument("--model_kwargs", nargs="*", action=ParseKwargs, default={}, metavar="KEY=VALUE",
                        help="override the student, e.g. depth=2 (smoke runs)")
    parser.add_argument("--teacher", default="openai/clip-vit-base-patch16")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--mask_ratio", type=float, default=0.7)
    parser.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                        help="ours (default: bf16 on CUDA, none on CPU)")
    parser.add_argument("--compile", action="store_true", help="also time ours compiled (torch.compile)")
    parser.add_argument("--compile_fd", action="store_true", help="with --compile, also FD compiled")
    parser.add_argument("--loop", action="store_true", help="also time ours through engine.fit")
    parser.add_argument("--ref", default=None, metavar="DIR", help="also time the reference code extracted in DIR "
                                                                   "(needs transformers)")
    parser.add_argument("--align", choices=ALIGN_FORMS, default=None,
                        help="ours' alignment form (default: dynamic, the paper's eq. 1; with --ref: official, the "
                             "reference code's mix-then-adapt, so that both time the same computation)")
    parser.add_argument("--ref_amp", choices=("fp16", "bf16", "none"), default=None,
                        help="the reference's precision (default: its recipe, fp16 + GradScaler on CUDA; none on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setting (compilation included)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=1, help="alternating blocks per setting (medians reported)")
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers of the loop")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the card's dense bf16 peak for MFU (default: from the table, when the card is in it)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    args.align = args.align or ("official" if args.ref else "dynamic")
    if args.amp == "fp16" and not args.device.startswith("cuda") or (
            args.ref_amp == "fp16" and not args.device.startswith("cuda")):
        parser.error("fp16 needs CUDA (its GradScaler)")
    if "align" in args.model_kwargs:
        parser.error("give the alignment form with --align, not --model_kwargs align=...")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    if args.ref:
        try:
            import transformers  # noqa: F401
        except ImportError:
            parser.error("--ref needs the `transformers` package (pip install transformers); nothing else does")
    run(args)


if __name__ == "__main__":
    main()
