"""Console progress (MAE's MetricLogger style: smoothed values, ETA, throughput) and tensorboard output."""
import datetime
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Optional

import torch

logger = logging.getLogger("maskalign")


class SmoothedValue:
    """Windowed median/average and the global average of a scalar series."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque = deque(maxlen=window)
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        if not self.values:  # restored from a checkpoint (which keeps the totals, not the window): nothing newer
            return self.global_avg
        return float(torch.tensor(list(self.values)).median())

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        return f"{self.median:.4f} ({self.global_avg:.4f})"


class MetricLogger:
    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value), n)

    def averages(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def state_dict(self) -> dict[str, list[float]]:
        """The running sums behind `averages` (plain numbers, for a checkpoint)."""
        return {name: [meter.total, meter.count] for name, meter in self.meters.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        for name, (total, count) in state.items():
            self.meters[name].total, self.meters[name].count = float(total), int(count)

    def log_every(self, iterable: Iterable, print_freq: int, header: str, total: int,
                  batch_size: int) -> Iterator:
        """Yields from `iterable`, logging progress with ETA and img/s every `print_freq` iterations."""
        start = last = time.time()
        last_done = 0
        for i, item in enumerate(iterable):
            yield item
            done = i + 1
            if i % print_freq == 0 or done == total:
                now = time.time()
                eta = datetime.timedelta(seconds=int((now - start) / done * (total - done)))
                img_s = batch_size * (done - last_done) / max(now - last, 1e-9)
                last, last_done = now, done
                meters = self.delimiter.join(f"{k}: {v}" for k, v in self.meters.items())
                logger.info("%s [%d/%d]  eta: %s  %s  img/s: %.1f", header, done, total, eta, meters, img_s)
        logger.info("%s done in %s", header, datetime.timedelta(seconds=int(time.time() - start)))


class TensorboardWriter:
    """A SummaryWriter on the main process only; every call is a no-op elsewhere (or without log_dir)."""

    def __init__(self, log_dir: Optional[str], enabled: bool) -> None:
        self.writer = None
        if log_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def image(self, name: str, image_chw: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_image(name, image_chw, step)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def setup_logging(is_main: bool) -> None:
    """INFO on the main process; warnings and errors only on the others (no 8x duplicated progress)."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
