"""Images/s of each data backend, per core and through the DataLoader, next to what the GPU step consumes.

    python benchmarks/bench_data.py                          # 200 generated ImageNet-like JPEGs, CPU backends
    python benchmarks/bench_data.py --data_path /imagenet/train --limit 2000 --workers 1 2 16
    python benchmarks/bench_data.py --device cuda            # + the gpu backend end to end (a few minutes)
    python benchmarks/bench_data.py --smoke                  # every code path on a tiny set, seconds (CI)

Without --data_path it writes (once) 200 JPEGs cut from scikit-image's shipped photos: 500x375 or 375x500,
quality 90, and prints their size distribution (real ImageNet files average ~110 KB and decode more slowly).
Per backend it prints: per-core img/s (timed inside one DataLoader worker: one process, one thread),
then img/s through a DataLoader with 1, 2 and N workers including the batch's way onto --device (for `fast`
the normalisation; for `gpu` the decode and crop, on the GPU with --device cuda), and the cores 8 GPUs need.
Measurements of all backends alternate round by round and the median is reported, because a shared
machine's load changes under a long run.
"""
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.photos import shipped_photos  # noqa: E402
from util.args import new_parser  # noqa: E402
from util.data import DATA_BACKENDS, build_train_data  # noqa: E402
from util.sampler import PerSampleSeeded  # noqa: E402

# benchmarks/bench_pretrain.py, README "Speed": ViT-B/16 student + CLIP-B/16 teacher, bf16, batch 128, one H200
STEP_IMG_S = 2690
GPUS = 8


def make_imagenet_like(root: str, n: int = 200, seed: int = 0) -> str:
    """root/train/photos/*.jpg: random crops of the shipped photos scaled to 500x375 (3 in 4) or 375x500."""
    out = os.path.join(root, "train", "photos")
    done = os.path.join(root, f".complete-{n}-{seed}")
    if os.path.exists(done):
        return root
    os.makedirs(out, exist_ok=True)
    photos = [im for im in (Image.open(p).convert("RGB") for p in shipped_photos()) if min(im.size) >= 256]
    rng = np.random.default_rng(seed)
    for k in range(n):
        photo = photos[k % len(photos)]
        width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
        zoom = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.6)
        big = photo.resize((max(width, round(photo.width * zoom)), max(height, round(photo.height * zoom))),
                           Image.BICUBIC)
        x, y = int(rng.integers(0, big.width - width + 1)), int(rng.integers(0, big.height - height + 1))
        big.crop((x, y, x + width, y + height)).save(os.path.join(out, f"{k:05d}.jpg"), quality=90)
    open(done, "w").close()
    return root


def describe(dataset) -> str:
    if not all(isinstance(p, str) for p, _ in dataset.samples):
        return f"{len(dataset)} samples in tar shards"
    sizes = np.array([os.path.getsize(p) for p, _ in dataset.samples]) / 1000
    shapes = Counter(Image.open(p).size for p, _ in dataset.samples)
    common = ", ".join(f"{w}x{h} {c / len(sizes):.0%}" for (w, h), c in shapes.most_common(3))
    return (f"{len(sizes)} files: {sizes.mean():.1f} KB mean (p5 {np.percentile(sizes, 5):.1f}, median "
            f"{np.median(sizes):.1f}, p95 {np.percentile(sizes, 95):.1f} KB); sizes {common}")


class _TimedInWorker(torch.utils.data.Dataset):
    """One item: the img/s of loading `limit` samples, measured inside the DataLoader worker itself."""

    def __init__(self, dataset, limit: int) -> None:
        self.dataset, self.limit = dataset, limit

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _) -> float:
        for i in range(5):  # warm-up: the worker's first decode pays for lazy initialisation
            self.dataset[i % len(self.dataset)]
        start = time.perf_counter()
        for i in range(self.limit):
            self.dataset[i % len(self.dataset)]
        return self.limit / (time.perf_counter() - start)


def per_core(dataset, limit: int) -> float:
    """img/s of one DataLoader worker (one process, one thread), timed inside it: no batching, no transfer."""
    return next(iter(DataLoader(_TimedInWorker(dataset, limit), batch_size=None, num_workers=1)))


def through_loader(data, dataset, workers: int, batch_size: int, images: int, device: torch.device) -> float:
    """img/s through a DataLoader (persistent workers, pinned memory on CUDA) and the batch's way onto
    `device`, timed from the first batch on (worker start-up excluded)."""
    order = [i % len(dataset) for i in range(images + batch_size)]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers, drop_last=True,
                        collate_fn=data.collate_fn, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    to_device = data.batch_to_device or (lambda b, d: [t.to(d, non_blocking=True) for t in b])
    batches = iter(loader)
    to_device(next(batches), device)
    start, count = time.perf_counter(), 0
    for batch in batches:
        out = to_device(batch, device)
        count += len(out[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def device_only(data, dataset, batch_size: int, device: torch.device, batches: int) -> float:
    """img/s of the backend's device hook alone on ready batches (for `gpu`: nvJPEG decode + roi_align)."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=list(range(min(len(dataset), batch_size))),
                        collate_fn=data.collate_fn)
    batch = next(iter(loader))
    data.batch_to_device(batch, device)  # warm-up (nvJPEG handles, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        data.batch_to_device(batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * len(batch[0]) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--data_path", default=None, help="ImageFolder (or shards) to read; default: generated")
    parser.add_argument("--gen_dir", default=os.path.join(tempfile.gettempdir(), "maskalign_bench_data"))
    parser.add_argument("--num_images", type=int, default=200, help="images to generate")
    parser.add_argument("--backends", nargs="+", choices=DATA_BACKENDS, default=None,
                        help="default: pil fast, plus gpu with --device cuda (on CPU, gpu measures its workers "
                             "alone: read + header + crop draw)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, os.cpu_count()])
    parser.add_argument("--limit", type=int, default=400, help="images per per-core measurement")
    parser.add_argument("--loader_images", type=int, default=2048, help="images per DataLoader measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: checks that every path runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.input_size, args.batch_size, args.limit = 8, 32, 4, 8
        args.loader_images, args.rounds, args.workers = 8, 1, [0, 1]
        args.backends = args.backends or list(DATA_BACKENDS)  # gpu's hook runs on CPU tensors too
        args.gen_dir = os.path.join(args.gen_dir, "smoke")
    device = torch.device(args.device)
    backends = args.backends or (["pil", "fast", "gpu"] if device.type == "cuda" else ["pil", "fast"])
    data_path = args.data_path or make_imagenet_like(args.gen_dir, args.num_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core figures; restored so that a caller's process is left as it was
    try:
        _measure(args, device, backends, data_path)
    finally:
        torch.set_num_threads(threads)


def _measure(args, device, backends, data_path):
    datas = {b: build_train_data(b, data_path, args.input_size) for b in backends}
    print(f"data: {data_path}\n  {describe(datas[backends[0]].dataset)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {device}, input {args.input_size}, "
          f"batch {args.batch_size}; medians of {args.rounds} alternating rounds")

    seeded = {b: PerSampleSeeded(d.dataset, 0) for b, d in datas.items()}
    results = {b: {} for b in backends}
    for round_ in range(args.rounds):
        for b in backends:
            results[b].setdefault("core", []).append(per_core(seeded[b], args.limit))
        print(f"round {round_ + 1}: per core " + ", ".join(f'{b} {results[b]["core"][-1]:.0f}' for b in backends),
              flush=True)
        for workers in sorted(set(args.workers)):
            for b in backends:
                if b == "gpu" and device.type != "cuda" and not args.smoke:
                    continue
                rate = through_loader(datas[b], seeded[b], workers, args.batch_size, args.loader_images, device)
                results[b].setdefault(f"{workers} workers", []).append(rate)
        if "gpu" in backends and (device.type == "cuda" or args.smoke):
            rate = device_only(datas["gpu"], seeded["gpu"], args.batch_size, device, 3 if args.smoke else 20)
            results["gpu"].setdefault("device hook", []).append(rate)

    need = STEP_IMG_S * GPUS
    print(f"\nthe step consumes {STEP_IMG_S} img/s per GPU (bench_pretrain: ViT-B/16 + CLIP-B/16, bf16, batch 128, "
          f"one H200); {GPUS} GPUs need {need:,} img/s")
    print(f'{"backend":8s} {"measurement":16s} {"img/s":>9s}  {"cores for 8 GPUs":>16s}')
    for b in backends:
        for name, rates in results[b].items():
            rate = statistics.median(rates)
            label = "per core (worker)" if name == "core" and b != "gpu" else \
                "per core (reads)" if name == "core" else name
            cores = f"{need / rate:16.0f}" if name == "core" else ""
            print(f"{b:8s} {label:16s} {rate:9.0f}  {cores}")
    if "pil" in results and "fast" in results:  # the ratio within each round, so load drifts cancel
        ratios = [f / p for f, p in zip(results["fast"]["core"], results["pil"]["core"])]
        print(f'\nfast / pil per core: {statistics.median(ratios):.2f}x (median of the rounds: '
              f'{", ".join(f"{r:.2f}" for r in ratios)})')


if __name__ == "__main__":
    main()
