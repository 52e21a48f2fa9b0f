"""The training loop shared by pre-training, fine-tuning and linear probing.

`fit` runs the epochs (sharding, DDP, exact resume, checkpoints, logs); `train_one_epoch` one epoch (lr
schedule, mixed precision, accumulation, the loss and gradient check, clipping, the stop-signal vote). No
micro-step waits for the device in steady state; docs/performance.md says how and what each check costs.
"""
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from util import checkpoint
from util.compile import compile_in_place
from util.data import TooManyBadSamplesError
from util.distributed import DistEnv, all_reduce_sum, barrier, cpu_group, destroy, init_distributed
from util.lr_schedule import adjust_learning_rate
from util.metrics import MetricLogger, TensorboardWriter, setup_logging
from util.sampler import PerSampleSeeded, ResumableDistributedSampler
from util.signals import DEFAULT_POLICY, StopPolicy, StopSignals

logger = logging.getLogger("maskalign")

# forward_fn(model, batch) -> (loss, {metric name: value}); it runs under autocast. Give metric values as
# 0-d tensors (a float is fine too): the loop reads them from the device without waiting for it.
ForwardFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf on some rank; every rank raises it at the same step."""


class TrainingInterrupted(Exception):
    """A stop signal arrived; the latest checkpoint has been written."""


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
    lr_given: bool = False  # --lr was on the command line (else it came from --blr)
    last_save: float = field(default_factory=time.time)
    # the running sums of the epoch's averages; saved mid-epoch, so a resumed epoch's log.txt line covers all of it
    metrics: MetricLogger = field(default_factory=MetricLogger)
    vote_group: Any = None  # process group of the host-side vote (None: the default group)


def amp_dtype(args) -> Optional[torch.dtype]:
    """The autocast dtype of --amp (None: float32 throughout)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)


def autocast(args, device: torch.device):
    if amp_dtype(args) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(args))


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
    metric_logger = ctx.metrics
    params = [p for p in model.parameters() if p.requires_grad]
    accum = args.accum_iter
    lr = 0.0
    steps = range(start_step, steps_per_epoch)
    progress = metric_logger.log_every(_steps_and_batches(steps, batches), args.print_freq, f"Epoch: [{epoch}]",
                                       total=len(steps), batch_size=args.batch_size * env.world_size)
    optimizer.zero_grad(set_to_none=True)
    monitor = StepMonitor(ctx, metric_logger, steps_per_epoch)
    sums: Optional[StepSums] = None
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
                _vote(ctx, epoch, step, data_error=batch)
            batch = [t.to(ctx.device, non_blocking=True) for t in batch]
            with autocast(args, ctx.device):
                loss, metrics = forward_fn(model, batch)
            _vote(ctx, epoch, step)  # while the device runs the forward
            sums = StepSums.add(sums, loss, metrics)
            scaled = _nan_if_not_finite(loss) / accum
            (ctx.scaler.scale(scaled) if ctx.scaler else scaled).backward()
        if not boundary:
            continue
        monitor.settle()  # the previous optimizer step: finished on the device by now
        grad_norm = _gradient_norm(optimizer, params, ctx)
        monitor.record(epoch, step, lr, sums, grad_norm)
        sums = None
        if not _update_skips_non_finite(optimizer, ctx):
            monitor.settle()  # this optimizer cannot skip on the device: the host checks before the update
        _apply_update(optimizer, ctx, grad_norm)
        if ctx.after_optimizer_step:
            ctx.after_optimizer_step()
        if step + 1 < steps_per_epoch:  # the epoch's end is checkpointed by `fit`, after its evaluation
            _maybe_checkpoint(ctx, epoch, step + 1, monitor)
    monitor.settle()
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


def _vote(ctx: LoopContext, epoch: int, step: int, data_error: Optional[TooManyBadSamplesError] = None) -> None:
    """All-reduce (save request, stop request, data failure) among the hosts, so every rank decides the same
    thing at the same step; a CPU process group, so the vote never waits for the device."""
    save, stop = ctx.signals.take_pending()
    votes = torch.tensor([float(save), float(stop), float(data_error is not None)], dtype=torch.float64)
    all_reduce_sum(votes, ctx.vote_group)
    ctx.signals.agreed_save |= bool(votes[0] > 0)
    ctx.signals.agreed_stop |= bool(votes[1] > 0)
    if data_error is not None:
        raise data_error
    if votes[2] > 0:
        raise TooManyBadSamplesError(f"another rank found too many unreadable images at epoch {epoch}, step "
                                     f"{step} (its log names them); stopping every rank")


def _nan_if_not_finite(loss: torch.Tensor) -> torch.Tensor:
    """The loss times 1, or times NaN when it is not finite: then every gradient it reaches is NaN, so the
    gradient check that guards the update covers a non-finite loss too (no host sync needed)."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


@dataclass
class StepSums:
    """One optimizer step's sums over its micro-steps, on the device: loss, non-finite losses, metrics."""
    values: torch.Tensor
    names: list[str]

    @staticmethod
    def add(sums: Optional["StepSums"], loss: torch.Tensor, metrics: dict[str, Any]) -> "StepSums":
        loss = loss.detach().float().reshape(())
        values = [loss, (~torch.isfinite(loss)).float()]
        values += [v.detach().float().reshape(()) if torch.is_tensor(v)
                   else torch.full((), float(v), device=loss.device)
                   for v in metrics.values()]
        values = torch.stack(values)
        if sums is None:
            return StepSums(values, list(metrics))
        return StepSums(sums.values + values, sums.names)


class StepMonitor:
    """What each optimizer step left on the device (loss, non-finite losses, metrics, gradient norm), read on
    the host later: `record` starts a non-blocking copy, `settle` reads every recorded step, logs it and raises
    NonFiniteLossError for a non-finite loss (or gradient, outside fp16) on every rank at the same step.
    Settled at the next optimizer step, before a checkpoint is written and at the end of the epoch, so no
    checkpoint ever holds an update from a non-finite step (the update itself was skipped on the device)."""

    def __init__(self, ctx: LoopContext, metric_logger: MetricLogger, steps_per_epoch: int) -> None:
        self.ctx, self.metric_logger, self.steps_per_epoch = ctx, metric_logger, steps_per_epoch
        self.pending: list[tuple[int, int, float, list[str], torch.Tensor, Any]] = []
        self.recorded = 0
        self.window_start, self.window_images = time.time(), 0

    def record(self, epoch: int, step: int, lr: float, sums: StepSums, grad_norm: torch.Tensor) -> None:
        values = sums.values
        if self.ctx.env.enabled:
            all_reduce_sum(values)  # on the device stream: the host does not wait
        values = torch.cat([values, grad_norm.detach().float().reshape(1)])
        ready = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.pending.append((epoch, step, lr, sums.names, values, ready))

    def settle(self) -> None:
        pending, self.pending = self.pending, []
        for epoch, step, lr, names, values, ready in pending:
            if ready is not None:
                ready.synchronize()
            self._read(epoch, step, lr, names, values.tolist())

    def _read(self, epoch: int, step: int, lr: float, names: list[str], values: list[float]) -> None:
        ctx = self.ctx
        micro_steps = ctx.args.accum_iter * ctx.env.world_size
        loss, non_finite, grad_norm = values[0] / micro_steps, values[1], values[-1]
        if non_finite:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {step} (on {int(non_finite)} of {micro_steps} micro-batches); "
                f"the step was not applied, stopping every rank. {nonfinite_advice(ctx)}")
        if not math.isfinite(grad_norm) and ctx.scaler is None:  # fp16: the scaler skipped it, lowering its scale
            raise NonFiniteLossError(f"non-finite gradient norm at epoch {epoch}, step {step}; the step was not "
                                     f"applied. {nonfinite_advice(ctx)}")
        metrics = {name: v / micro_steps for name, v in zip(names, values[2:-1])}
        self.metric_logger.update(loss=loss, lr=lr, grad_norm=grad_norm, **metrics)
        self.window_images += ctx.args.batch_size * micro_steps
        if self.recorded % ctx.args.print_freq == 0:  # tensorboard at the console's pace, not every step
            now = time.time()
            img_s = self.window_images / max(now - self.window_start, 1e-9)
            self.window_start, self.window_images = now, 0
            epoch_1000x = int((step + 1) / self.steps_per_epoch * 1000 + epoch * 1000)
            ctx.writer.scalars({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/img_s": img_s,
                                **{f"train/{k}": v for k, v in metrics.items()}}, epoch_1000x)
        self.recorded += 1


def nonfinite_advice(ctx: LoopContext) -> str:
    """What to change after a non-finite loss or gradient, and where the run then continues from."""
    args = ctx.args
    changes = ["lower --lr" if ctx.lr_given else "lower --blr",
               "set --clip_grad" if args.clip_grad is None else "lower --clip_grad"]
    if args.amp != "none":
        changes.append("try --amp " + ("bf16 or none" if args.amp == "fp16" else "none"))
    change = ", ".join(changes[:-1]) + " or " + changes[-1]
    again = "resubmit the job" if ctx.signals.policy.requeued_by_launcher else "rerun"
    own = checkpoint.find_resume(args.output_dir)
    if own:
        return f"The last checkpoint, {own}, is intact: {change}, then {again} to resume from it."
    start = f"--resume {args.resume}" if args.resume else "the beginning"
    return f"No checkpoint of this run was written yet: {change}, then {again} to start again from {start}."


def _gradient_norm(optimizer, params: list, ctx: LoopContext) -> torch.Tensor:
    """The global gradient norm (after unscaling, fp16), clipping to --clip_grad; stays on the device."""
    if ctx.scaler:
        ctx.scaler.unscale_(optimizer)
    if ctx.args.clip_grad is not None:
        return torch.nn.utils.clip_grad_norm_(params, ctx.args.clip_grad)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _update_skips_non_finite(optimizer, ctx: LoopContext) -> bool:
    """Whether a non-finite gradient stops the update on the device: the fp16 grad scaler, or an optimizer
    that takes `found_inf` (torch's fused AdamW/Adam/SGD)."""
    return ctx.scaler is not None or getattr(optimizer, "_step_supports_amp_scaling", False)


def _apply_update(optimizer, ctx: LoopContext, grad_norm: torch.Tensor) -> None:
    if ctx.scaler:  # fp16: an inf/nan gradient makes the scaler skip the step and lower its scale
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        # same value on every rank (gradients are all-reduced): every rank skips or applies alike
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        optimizer.step()
        del optimizer.found_inf
    else:  # the monitor has settled this step: its gradient is finite
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _maybe_checkpoint(ctx: LoopContext, epoch: int, next_step: int, monitor: Optional[StepMonitor] = None) -> None:
    """Within an epoch, at an optimizer-step boundary: on an agreed signal, or when the timer is due
    (only rank 0 writes, so its timer alone matters). Pending step records are settled first."""
    due = time.time() - ctx.last_save >= ctx.args.save_interval_min * 60
    if ctx.signals.agreed_save or ctx.signals.agreed_stop or due:
        if monitor is not None:
            monitor.settle()  # a non-finite step raises here, before anything is written
        ctx.save_latest(epoch, next_step)
        ctx.last_save = time.time()
        ctx.signals.agreed_save = False
    _stop_if_agreed(ctx, epoch, next_step)


def _stop_if_agreed(ctx: LoopContext, epoch: int, next_step: int) -> None:
    if ctx.signals.agreed_stop:
        barrier()  # no rank leaves (and gets its job torn down) before rank 0 has written the checkpoint
        then = "the job is requeued and resumes" if ctx.signals.policy.requeued_by_launcher \
            else "rerun the same command to resume"
        raise TrainingInterrupted(f"stopped by signal at epoch {epoch}, step {next_step}; {then}")


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
        checkpoint.remove_stale_temp_files(args.output_dir)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return env, device


def configure_backends(device: torch.device) -> None:
    """As MAE: let cuDNN pick the fastest kernels for the fixed input shapes (the patch-embedding conv); TF32 for
    the float32 CUDA matmuls left outside autocast (set for CUDA only: `set_float32_matmul_precision` would also
    lower CPU matmuls to TF32 where the CPU has it)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True


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
    # the data backend's hooks (util/data.py TrainData): batching, and the batch's way onto the device
    # (e.g. uint8 normalised there, or JPEGs decoded there); None: default collation, every tensor .to(device)
    collate_fn: Optional[Callable] = None
    batch_to_device: Optional[Callable[[Any, torch.device], list]] = None


def fit(args, env: DistEnv, device: torch.device, task: Task,
        stop_policy: StopPolicy = DEFAULT_POLICY) -> None:
    """Train `task` for args.epochs, resuming exactly from the latest checkpoint of args.output_dir; the
    signals of `stop_policy` save or stop at the next step."""
    # epoch-tagged indices: persistent workers keep their dataset copy, so the epoch travels with the index
    sampler = ResumableDistributedSampler(len(task.dataset), env.rank, env.world_size, seed=args.seed,
                                          tag_epoch=True)
    steps_per_epoch = (sampler.per_rank // args.batch_size) // args.accum_iter * args.accum_iter
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(task.dataset)} images are too few for --batch_size {args.batch_size} x "
                         f"--accum_iter {args.accum_iter} on {env.world_size} process(es)")
    eff_batch = args.batch_size * args.accum_iter * env.world_size
    lr_given = args.lr is not None
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    logger.info("effective batch %d, lr %.3g (blr %.3g), %d steps/epoch", eff_batch, args.lr, args.blr,
                steps_per_epoch)
    model = task.model
    watch = compile_in_place(model) if getattr(args, "compile", False) else None
    if env.enabled:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    start_epoch, start_step, epoch_metrics = args.start_epoch, 0, {}
    resume = checkpoint.choose_resume(args.resume, args.output_dir)
    if resume:
        start_epoch, start_step, ckpt = checkpoint.restore_training_state(resume, task.model, task.optimizer, scaler)
        start_step = checkpoint.step_for_batch(ckpt, start_step, args.batch_size, env.world_size)
        start_step -= start_step % args.accum_iter  # continue at an optimizer-step boundary
        epoch_metrics = ckpt.get("epoch_metrics", {}) if start_step else {}
        if task.load_extra_state:
            task.load_extra_state(ckpt)
        if env.is_main and os.path.abspath(resume) == os.path.abspath(os.path.join(args.output_dir, checkpoint.LATEST)):
            _complete_epoch_end(args, ckpt, resume)

    def save_latest(epoch: int, next_step: int, epoch_log: Optional[dict] = None) -> None:
        if not env.is_main:
            return
        finished = next_step >= steps_per_epoch
        progress = {"epoch_log": epoch_log} if finished else {"epoch_metrics": ctx.metrics.state_dict()}
        state = checkpoint.training_state(
            task.model, task.optimizer, scaler, args, epoch_done=epoch if finished else epoch - 1,
            resume_epoch=epoch + 1 if finished else epoch, resume_step=0 if finished else next_step,
            global_step=epoch * steps_per_epoch + next_step, world_size=env.world_size,
            extra={**(task.extra_state() if task.extra_state else {}), **progress})
        checkpoint.save_atomic(state, os.path.join(args.output_dir, checkpoint.LATEST))
        if finished and _keeps_numbered(args, epoch):
            checkpoint.save_atomic(state, checkpoint.numbered_path(args.output_dir, epoch))

    writer = TensorboardWriter(args.log_dir, env.is_main)
    ctx = LoopContext(args=args, env=env, device=device, writer=writer, save_latest=save_latest,
                      signals=StopSignals(stop_policy).install(), scaler=scaler,
                      after_optimizer_step=task.after_optimizer_step, lr_given=lr_given,
                      vote_group=cpu_group(args.dist_timeout_min))
    logger.info("training epochs %d..%d from step %d", start_epoch, args.epochs - 1, start_step)
    start_time = time.time()
    workers = args.num_workers
    loader = DataLoader(task.dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True, collate_fn=task.collate_fn,
                        persistent_workers=workers > 0, prefetch_factor=args.prefetch_factor if workers else None,
                        worker_init_fn=stop_policy.worker_init_fn)
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch, start=start_step * args.batch_size)
            task.dataset.set_epoch(epoch)
            ctx.metrics = MetricLogger()
            ctx.metrics.load_state_dict(epoch_metrics)
            epoch_metrics = {}
            batches = loader if task.batch_to_device is None else _on_device(loader, task.batch_to_device, device)
            stats = train_one_epoch(model, task.forward_fn, batches, task.optimizer, epoch, start_step,
                                    steps_per_epoch, ctx)
            start_step = 0
            extra_log = task.end_of_epoch(epoch, writer) if task.end_of_epoch else {}
            record = {**{f"train_{k}": v for k, v in stats.items()}, **extra_log, "epoch": epoch,
                      "bad_images": task.dataset.num_bad}
            save_latest(epoch, steps_per_epoch, epoch_log=record)  # the record too: see _complete_epoch_end
            ctx.last_save = time.time()
            _log_epoch(args, env, writer, record)
            if watch is not None:  # the first epoch is the warm-up: later graphs are recompiles
                if watch.warm_graphs is None:
                    watch.mark_warm()
                logger.info("%s", watch.summary())
            _stop_if_agreed(ctx, epoch, steps_per_epoch)
    finally:
        ctx.signals.uninstall()
        writer.close()
    logger.info("training time %.1f s", time.time() - start_time)


def _on_device(batches: Iterable, to_device: Callable[[Any, torch.device], list], device: torch.device):
    """Batches through the backend's device hook, one batch ahead: the next batch's copy (or GPU decode) is
    queued before the current step's work. A data failure raised here reaches the loop's vote like any other."""
    pending = None
    for batch in batches:
        ready = to_device(batch, device)
        if pending is not None:
            yield pending
        pending = ready
    if pending is not None:
        yield pending


def _keeps_numbered(args, epoch: int) -> bool:
    """Whether `epoch` gets a checkpoint-<epoch>.pth besides checkpoint-latest.pth."""
    return (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs


def _complete_epoch_end(args, ckpt: dict, latest: str) -> None:
    """checkpoint-latest.pth is written first at an epoch's end; a kill before that epoch's numbered checkpoint
    or log.txt line would lose them for good (the rerun starts at the next epoch), so the rerun writes them."""
    record = ckpt.get("epoch_log")
    if record is None:  # not written at an epoch's end
        return
    epoch = record["epoch"]
    numbered = checkpoint.numbered_path(args.output_dir, epoch)
    if _keeps_numbered(args, epoch) and not os.path.exists(numbered):
        checkpoint.copy_atomic(latest, numbered)
        logger.warning("wrote %s, which an interrupted run left out", numbered)
    if _last_logged_epoch(args.output_dir) != epoch:
        _append_log(args.output_dir, record)
        logger.warning("added epoch %d to log.txt, which an interrupted run left out", epoch)


def _last_logged_epoch(output_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(output_dir, "log.txt")) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1]).get("epoch") if lines else None
    except (OSError, ValueError):
        return None


def _append_log(output_dir: str, record: dict) -> None:
    with open(os.path.join(output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _log_epoch(args, env: DistEnv, writer: TensorboardWriter, record: dict) -> None:
    """MAE's log.txt: one JSON line per epoch."""
    if env.is_main:
        _append_log(args.output_dir, record)
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
