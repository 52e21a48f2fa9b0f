"""The training loop shared by pre-training, fine-tuning and linear probing.

`fit` runs the epochs (data sharding, DDP, resume, checkpoints, logs); `train_one_epoch` runs one epoch of:
per-iteration lr schedule, mixed precision, gradient accumulation (no all-reduce on the non-final micro-steps),
a loss check that stops every rank together, gradient clipping, logging, and `checkpoint-latest.pth` on a
timer or on SIGTERM / SIGUSR1. Each micro-step re-seeds the RNGs from
(seed, rank, epoch, step), so a run resumed from any checkpoint continues exactly as if never stopped.
"""
import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from util import checkpoint
from util.data import TooManyBadSamplesError
from util.distributed import DistEnv, all_reduce_sum, barrier, destroy, init_distributed
from util.lr_schedule import adjust_learning_rate
from util.metrics import MetricLogger, TensorboardWriter, setup_logging
from util.sampler import PerSampleSeeded, ResumableDistributedSampler

logger = logging.getLogger("maskalign")

# forward_fn(model, batch) -> (loss, {metric name: value}); it runs under autocast.
ForwardFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf on some rank; every rank raises it at the same step."""


class TrainingInterrupted(Exception):
    """A stop signal arrived; the latest checkpoint has been written."""


@dataclass
class StopSignals:
    """SIGUSR1 asks for a checkpoint; SIGTERM for a checkpoint and a clean stop.

    Handlers only raise *pending* requests, whenever the signal lands. Each micro-step hands the pending
    requests to one all-reduce, and the loop acts only on the *agreed* result, which is the same on every rank
    at every step boundary even when the signal reached the ranks at different moments.
    `actions` maps each handled signal to "save" or "stop"; a launcher may remap them for its process
    (submitit_launch.py: the preemption signal stops, SIGTERM only saves).
    """
    actions: ClassVar[dict[int, str]] = {signal.SIGUSR1: "save", signal.SIGTERM: "stop"}
    pending_save: bool = False
    pending_stop: bool = False
    agreed_save: bool = False
    agreed_stop: bool = False
    _previous: dict = field(default_factory=dict)

    def install(self) -> "StopSignals":
        for sig, action in self.actions.items():
            self._previous[sig] = signal.signal(sig, self._on_stop if action == "stop" else self._on_save)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def take_pending(self) -> tuple[bool, bool]:
        """The requests to put to the vote; a save request is consumed, a stop request stays."""
        save, self.pending_save = self.pending_save, False
        return save, self.pending_stop

    def _on_save(self, signum, frame) -> None:
        logger.warning("signal %d: checkpoint at the next step", signum)
        self.pending_save = True

    def _on_stop(self, signum, frame) -> None:
        logger.warning("signal %d: checkpoint and stop at the next step", signum)
        self.pending_stop = True


@dataclass
class LoopContext:
    """What the loop needs beyond model, data and optimizer."""
    args: Any
    env: DistEnv
    device: torch.device
    writer: TensorboardWriter
    save_latest: Callable[[int, int], None]  # (epoch, micro-step to resume at)
    signals: StopSignals
    scaler: Optional[torch.amp.GradScaler] = None
    after_optimizer_step: Optional[Callable[[], None]] = None  # e.g. a model EMA update
    last_save: float = field(default_factory=time.time)


def autocast(args, device: torch.device):
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def seed_step(seed: int, rank: int, epoch: int, step: int) -> None:
    """Masking, drop path, dropout and mixup draw from a state that depends only on where the run is."""
    step_seed = hash((seed, rank, epoch, step)) % (2 ** 31)
    torch.manual_seed(step_seed)
    random.seed(step_seed)
    np.random.seed(step_seed)


def train_one_epoch(model: torch.nn.Module, forward_fn: ForwardFn, batches: Iterable, optimizer,
                    epoch: int, start_step: int, steps_per_epoch: int, ctx: LoopContext) -> dict[str, float]:
    """Runs micro-steps start_step..steps_per_epoch-1 of `epoch`; returns the epoch's average metrics."""
    args, env = ctx.args, ctx.env
    model.train(True)
    metric_logger = MetricLogger()
    params = [p for p in model.parameters() if p.requires_grad]
    accum = args.accum_iter
    lr = 0.0
    steps = range(start_step, steps_per_epoch)
    progress = metric_logger.log_every(_steps_and_batches(steps, batches), args.print_freq, f"Epoch: [{epoch}]",
                                       total=len(steps), batch_size=args.batch_size * env.world_size)
    optimizer.zero_grad(set_to_none=True)
    images_per_step = args.batch_size * accum * env.world_size
    step_start = time.time()
    for step, batch in progress:
        if step % accum == 0:
            lr = adjust_learning_rate(optimizer, step / steps_per_epoch + epoch, args)
        seed_step(args.seed, env.rank, epoch, step)
        boundary = (step + 1) % accum == 0
        # DDP decides in forward whether backward all-reduces: no_sync must cover both
        sync = contextlib.nullcontext() if boundary or not isinstance(model, DistributedDataParallel) \
            else model.no_sync()
        with sync:
            if isinstance(batch, TooManyBadSamplesError):  # this rank's data failed: it only takes part in the vote
                _check_loss(torch.zeros(()), ctx, epoch, step, data_error=batch)
            batch = [t.to(ctx.device, non_blocking=True) for t in batch]
            with autocast(args, ctx.device):
                loss, metrics = forward_fn(model, batch)
            loss_value = _check_loss(loss, ctx, epoch, step)
            scaled = loss / accum
            (ctx.scaler.scale(scaled) if ctx.scaler else scaled).backward()
        if not boundary:
            continue
        grad_norm = _optimizer_step(optimizer, params, ctx, epoch, step)
        if ctx.after_optimizer_step:
            ctx.after_optimizer_step()
        now = time.time()
        img_s, step_start = images_per_step / max(now - step_start, 1e-9), now
        metric_logger.update(loss=loss_value, lr=lr, grad_norm=grad_norm, **metrics)
        epoch_1000x = int((step + 1) / steps_per_epoch * 1000 + epoch * 1000)
        ctx.writer.scalars({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/img_s": img_s, **{f"train/{k}": v for k, v in metrics.items()}}, epoch_1000x)
        if step + 1 < steps_per_epoch:  # the epoch's end is checkpointed by `fit`, after its evaluation
            _maybe_checkpoint(ctx, epoch, step + 1)
    return metric_logger.averages()


def _steps_and_batches(steps: range, batches: Iterable) -> Iterable[tuple[int, Any]]:
    """(step, batch) pairs; a data failure comes out as the batch so that the loop can share it with every
    rank (one rank raising alone would leave the others waiting in a collective until its timeout)."""
    iterator = iter(batches)
    for step in steps:
        try:
            yield step, next(iterator)
        except StopIteration:
            return
        except TooManyBadSamplesError as e:
            yield step, e
            return


def _check_loss(loss: torch.Tensor, ctx: LoopContext, epoch: int, step: int,
                data_error: Optional[TooManyBadSamplesError] = None) -> float:
    """All-reduce (loss, save request, stop request, data failure) in one collective, so every rank decides
    the same thing."""
    save, stop = ctx.signals.take_pending()
    flags = torch.tensor([loss.detach().float().item(), float(save), float(stop), float(data_error is not None)],
                         dtype=torch.float64, device=ctx.device)
    all_reduce_sum(flags)
    ctx.signals.agreed_save |= bool(flags[1] > 0)
    ctx.signals.agreed_stop |= bool(flags[2] > 0)
    if data_error is not None:
        raise data_error
    if flags[3] > 0:
        raise TooManyBadSamplesError(f"another rank found too many unreadable images at epoch {epoch}, step "
                                     f"{step} (its log names them); stopping every rank")
    if not math.isfinite(flags[0].item()):
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step} (local value {loss.item()}); stopping every rank. "
            f"{_INTACT_ADVICE.format(ctx.args.output_dir)}")
    return flags[0].item() / ctx.env.world_size


_INTACT_ADVICE = ("The last checkpoint in {} is intact: lower --blr, set --clip_grad, or try --amp bf16/none, "
                  "then rerun to resume from it.")


def _optimizer_step(optimizer, params: list, ctx: LoopContext, epoch: int, step: int) -> float:
    if ctx.scaler:
        ctx.scaler.unscale_(optimizer)
    max_norm = ctx.args.clip_grad if ctx.args.clip_grad is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    if ctx.scaler:  # fp16: an inf/nan gradient makes the scaler skip the step and lower its scale
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    elif not math.isfinite(grad_norm):  # same value on every rank: gradients are already all-reduced
        raise NonFiniteLossError(f"non-finite gradient norm at epoch {epoch}, step {step}; the step was not "
                                 f"applied. {_INTACT_ADVICE.format(ctx.args.output_dir)}")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _maybe_checkpoint(ctx: LoopContext, epoch: int, next_step: int) -> None:
    """Within an epoch, at an optimizer-step boundary: on an agreed signal, or when the timer is due
    (only rank 0 writes, so its timer alone matters)."""
    due = time.time() - ctx.last_save >= ctx.args.save_interval_min * 60
    if ctx.signals.agreed_save or ctx.signals.agreed_stop or due:
        ctx.save_latest(epoch, next_step)
        ctx.last_save = time.time()
        ctx.signals.agreed_save = False
    _stop_if_agreed(ctx, epoch, next_step)


def _stop_if_agreed(ctx: LoopContext, epoch: int, next_step: int) -> None:
    if ctx.signals.agreed_stop:
        barrier()  # no rank leaves (and gets its job torn down) before rank 0 has written the checkpoint
        raise TrainingInterrupted(f"stopped by signal at epoch {epoch}, step {next_step}; "
                                  f"rerun the same command to resume")


# ----------------------------------------------------------------------------------------- the whole run
def run_main(main: Callable[[Any], None], args) -> int:
    """Run an entry point's main(args) and map the expected ways a run ends to exit codes: 0 done,
    1 non-finite loss, too much bad data or an unusable checkpoint, 143 stopped by a signal (checkpoint written)."""
    try:
        main(args)
    except TrainingInterrupted as e:
        logger.warning("%s", e)
        return 143
    except (NonFiniteLossError, TooManyBadSamplesError, checkpoint.CheckpointError) as e:
        logger.error("%s", e)
        return 1
    finally:
        destroy()
    return 0


def setup(args) -> tuple[DistEnv, torch.device]:
    """Process group, logging, output directory and the initial seed (same weights on every rank)."""
    env = init_distributed(args.device, timeout_min=args.dist_timeout_min)
    setup_logging(env.is_main)
    device = torch.device(args.device, env.local_rank) if args.device == "cuda" else torch.device(args.device)
    configure_backends(device)
    if env.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return env, device


def configure_backends(device: torch.device) -> None:
    """As MAE: let cuDNN pick the fastest kernels for the fixed input shapes (the patch-embedding conv)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclass
class Task:
    """What differs between pre-training, fine-tuning and linear probing; `fit` does the rest."""
    model: torch.nn.Module  # unwrapped; `fit` wraps it in DDP
    forward_fn: ForwardFn
    dataset: PerSampleSeeded
    optimizer: torch.optim.Optimizer
    # called at the end of every epoch with (epoch, writer); returns extra log.txt fields
    end_of_epoch: Optional[Callable[[int, TensorboardWriter], dict[str, float]]] = None
    after_optimizer_step: Optional[Callable[[], None]] = None
    extra_state: Optional[Callable[[], dict]] = None  # saved in every checkpoint (e.g. EMA weights)
    load_extra_state: Optional[Callable[[dict], None]] = None


def fit(args, env: DistEnv, device: torch.device, task: Task) -> None:
    """Train `task` for args.epochs, resuming exactly from the latest checkpoint of args.output_dir."""
    sampler = ResumableDistributedSampler(len(task.dataset), env.rank, env.world_size, seed=args.seed)
    steps_per_epoch = (sampler.per_rank // args.batch_size) // args.accum_iter * args.accum_iter
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(task.dataset)} images are too few for --batch_size {args.batch_size} x "
                         f"--accum_iter {args.accum_iter} on {env.world_size} process(es)")
    eff_batch = args.batch_size * args.accum_iter * env.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    logger.info("effective batch %d, lr %.3g (blr %.3g), %d steps/epoch", eff_batch, args.lr, args.blr,
                steps_per_epoch)
    model = task.model
    if env.enabled:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    start_epoch, start_step = args.start_epoch, 0
    resume = checkpoint.choose_resume(args.resume, args.output_dir)
    if resume:
        start_epoch, start_step, ckpt = checkpoint.restore_training_state(resume, task.model, task.optimizer, scaler)
        start_step = checkpoint.step_for_batch(ckpt, start_step, args.batch_size, env.world_size)
        start_step -= start_step % args.accum_iter  # continue at an optimizer-step boundary
        if task.load_extra_state:
            task.load_extra_state(ckpt)

    def save_latest(epoch: int, next_step: int) -> None:
        if not env.is_main:
            return
        finished = next_step >= steps_per_epoch
        state = checkpoint.training_state(
            task.model, task.optimizer, scaler, args, epoch_done=epoch if finished else epoch - 1,
            resume_epoch=epoch + 1 if finished else epoch, resume_step=0 if finished else next_step,
            global_step=epoch * steps_per_epoch + next_step, world_size=env.world_size,
            extra=task.extra_state() if task.extra_state else None)
        checkpoint.save_atomic(state, os.path.join(args.output_dir, checkpoint.LATEST))
        if finished and ((epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs):
            checkpoint.save_atomic(state, checkpoint.numbered_path(args.output_dir, epoch))

    writer = TensorboardWriter(args.log_dir, env.is_main)
    ctx = LoopContext(args=args, env=env, device=device, writer=writer, save_latest=save_latest,
                      signals=StopSignals().install(), scaler=scaler, after_optimizer_step=task.after_optimizer_step)
    logger.info("training epochs %d..%d from step %d", start_epoch, args.epochs - 1, start_step)
    start_time = time.time()
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start=start_step * args.batch_size)
            task.dataset.set_epoch(epoch)
            loader = DataLoader(task.dataset, batch_size=args.batch_size, sampler=sampler,
                                num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda",
                                drop_last=True)
            stats = train_one_epoch(model, task.forward_fn, loader, task.optimizer, epoch, start_step,
                                    steps_per_epoch, ctx)
            start_step = 0
            extra_log = task.end_of_epoch(epoch, writer) if task.end_of_epoch else {}
            save_latest(epoch, steps_per_epoch)
            ctx.last_save = time.time()
            _log_epoch(args, env, writer, {**{f"train_{k}": v for k, v in stats.items()}, **extra_log,
                                           "epoch": epoch, "bad_images": task.dataset.num_bad})
            _stop_if_agreed(ctx, epoch, steps_per_epoch)
    finally:
        ctx.signals.uninstall()
        writer.close()
    logger.info("training time %.1f s", time.time() - start_time)


def _log_epoch(args, env: DistEnv, writer: TensorboardWriter, record: dict) -> None:
    """MAE's log.txt: one JSON line per epoch."""
    if env.is_main:
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")
        writer.flush()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device, args,
             distributed: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy; sums are all-reduced when each rank saw a shard."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(args, device):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        sums += torch.stack([torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(float(len(targets)), dtype=torch.float64, device=device)])
    if distributed:
        all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return {"acc1": 100.0 * sums[1].item() / n, "acc5": 100.0 * sums[2].item() / n, "loss": sums[0].item() / n}
