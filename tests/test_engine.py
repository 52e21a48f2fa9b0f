"""engine.py in isolation: signal agreement across ranks, DDP accumulation, resume position (issue #3)."""
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from tiny import assert_same_weights
from torch.nn.parallel import DistributedDataParallel

import engine
from util import checkpoint
from util.distributed import DistEnv
from util.metrics import MetricLogger, TensorboardWriter
from util.signals import DEFAULT_POLICY, StopSignals


def loop_context(tmp_path, saves, lr_given=False, stop_policy=DEFAULT_POLICY, **args):
    defaults = dict(accum_iter=1, save_interval_min=60.0, output_dir=str(tmp_path), print_freq=100, batch_size=2,
                    seed=0, amp="none", clip_grad=None, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, resume="")
    return engine.LoopContext(args=SimpleNamespace(**{**defaults, **args}), env=DistEnv(), device=torch.device("cpu"),
                              writer=TensorboardWriter(None, False), signals=StopSignals(stop_policy),
                              save_latest=lambda epoch, step: saves.append((epoch, step)), lr_given=lr_given)


def test_a_signal_landing_after_the_vote_waits_for_the_next_step(tmp_path):
    """Ranks act on the all-reduced vote only, so a signal that reached one rank mid-step (after that step's
    all-reduce) cannot make it stop alone: every rank stops together one step later."""
    saves = []
    ctx = loop_context(tmp_path, saves)
    engine._vote(ctx, epoch=0, step=0)  # this step's vote: nothing pending
    ctx.signals._on_stop(signal.SIGTERM, None)  # lands during backward / the optimizer step
    engine._maybe_checkpoint(ctx, epoch=0, next_step=1)  # not agreed yet: no stop here
    assert saves == []
    engine._vote(ctx, epoch=0, step=1)  # next vote carries it
    with pytest.raises(engine.TrainingInterrupted):
        engine._maybe_checkpoint(ctx, epoch=0, next_step=2)
    assert saves == [(0, 2)]


def test_a_save_request_is_honoured_once(tmp_path):
    saves = []
    ctx = loop_context(tmp_path, saves)
    ctx.signals._on_save(signal.SIGUSR1, None)
    for step in range(3):
        engine._vote(ctx, epoch=0, step=step)
        engine._maybe_checkpoint(ctx, epoch=0, next_step=step + 1)
    assert saves == [(0, 1)]


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_accumulation_all_reduces_only_on_the_last_micro_step(single_rank_group, tmp_path):
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, counting_hook)
    ctx = loop_context(tmp_path, [], accum_iter=4)
    batches = [(torch.randn(2, 4),) for _ in range(8)]
    engine.train_one_epoch(model, lambda m, b: (m(b[0]).pow(2).mean(), {}), batches,
                           torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, start_step=0, steps_per_epoch=8,
                           ctx=ctx)
    assert len(calls) == 2  # 8 micro-steps, accumulation 4: two all-reduces, not eight


def test_step_for_batch_keeps_the_sample_position():
    ckpt = {"args": {"batch_size": 4}, "world_size": 2}
    assert checkpoint.step_for_batch(ckpt, 6, batch_size=4, world_size=2) == 6
    assert checkpoint.step_for_batch(ckpt, 6, batch_size=8, world_size=1) == 6   # 48 samples either way
    assert checkpoint.step_for_batch(ckpt, 6, batch_size=16, world_size=2) == 1  # 48 // 32, 16 seen again
    assert checkpoint.step_for_batch({"args": {}}, 5, batch_size=4, world_size=1) == 5  # older checkpoints


def test_the_runs_own_latest_checkpoint_wins_over_resume(tmp_path):
    other = tmp_path / "elsewhere.pth"
    assert checkpoint.choose_resume(str(other), str(tmp_path)) == str(other)  # nothing of this run yet
    latest = tmp_path / checkpoint.LATEST
    latest.write_bytes(b"")
    assert checkpoint.choose_resume(str(other), str(tmp_path)) == str(latest)
    assert checkpoint.choose_resume("", str(tmp_path)) == str(latest)
    assert checkpoint.choose_resume("", None) is None
    assert os.path.exists(latest)


def test_bad_data_on_one_rank_stops_every_rank_at_once(tmp_path, monkeypatch):
    """The rank whose data failed votes instead of raising alone; the others learn it from the same all-reduce
    (without the vote they would wait in the next collective until its timeout)."""
    from util.data import TooManyBadSamplesError

    def batches():
        for step in range(6):
            if step == 2:
                raise TooManyBadSamplesError("3 of 4 attempted images were unreadable")
            yield (torch.randn(2, 4),)

    votes = []
    monkeypatch.setattr(engine, "all_reduce_sum", lambda t, group=None: votes.append(t.clone()) or t)
    model = torch.nn.Linear(4, 1)
    train = lambda data: engine.train_one_epoch(  # noqa: E731
        model, lambda m, b: (m(b[0]).pow(2).mean(), {}), data, torch.optim.SGD(model.parameters(), lr=0.1),
        epoch=0, start_step=0, steps_per_epoch=6, ctx=loop_context(tmp_path, []))
    with pytest.raises(TooManyBadSamplesError, match="3 of 4"):  # the failing rank: its own error, after voting
        train(batches())
    assert len(votes) == 3 and votes[-1][2] == 1.0  # steps 0, 1 voted "fine"; step 2 carried the failure
    assert all(v.device.type == "cpu" for v in votes)  # a host-side vote: it never waits for the device

    def another_rank_failed(t, group=None):  # a healthy rank: someone else's failure arrives in the vote
        t[2] += 1.0
        return t

    monkeypatch.setattr(engine, "all_reduce_sum", another_rank_failed)
    with pytest.raises(TooManyBadSamplesError, match="another rank found too many unreadable images at epoch 0"):
        train([(torch.randn(2, 4),)] * 6)


def nan_advice(tmp_path, **flags):
    return engine.nonfinite_advice(loop_context(tmp_path, [], **flags))


def test_advice_after_a_non_finite_loss_fits_the_run(tmp_path):
    message = nan_advice(tmp_path)  # --blr, amp none, no checkpoint yet
    assert "No checkpoint of this run was written yet" in message and "intact" not in message
    assert "lower --blr" in message and "--amp" not in message and "start again from the beginning" in message
    (tmp_path / checkpoint.LATEST).write_bytes(b"")
    message = nan_advice(tmp_path, lr_given=True, amp="bf16", clip_grad=1.0)
    assert f"The last checkpoint, {tmp_path / checkpoint.LATEST}, is intact" in message
    assert "lower --lr," in message and "--blr" not in message
    assert "lower --clip_grad" in message and "try --amp none" in message and "then rerun to resume" in message
    assert "try --amp bf16 or none" in nan_advice(tmp_path, amp="fp16")


def test_advice_inside_a_job_the_launcher_requeues_says_resubmit_not_rerun(tmp_path, monkeypatch):
    from util.slurm import submitit_stop_policy
    in_a_job = submitit_stop_policy(signal.SIGUSR2)
    assert "then resubmit the job to start again" in nan_advice(tmp_path, stop_policy=in_a_job)
    ctx = loop_context(tmp_path, [], stop_policy=in_a_job)
    ctx.signals.agreed_stop = True
    with pytest.raises(engine.TrainingInterrupted) as exc:
        engine._stop_if_agreed(ctx, epoch=0, next_step=2)
    assert "rerun" not in str(exc.value) and "requeued" in str(exc.value)
    assert "then rerun" in nan_advice(tmp_path)


def test_a_non_finite_gradient_gives_the_same_advice(tmp_path):
    monitor = engine.StepMonitor(loop_context(tmp_path, []), MetricLogger(), steps_per_epoch=4)
    with pytest.raises(engine.NonFiniteLossError, match="non-finite gradient norm at epoch 0, step 1; the step was "
                                                         "not applied. No checkpoint of this run was written yet: "
                                                         "lower --blr"):
        monitor._read(0, 1, 0.1, [], [1.0, 0.0, float("inf")])  # loss, non-finite losses, grad norm


def test_workers_that_drop_stop_signals_still_end_with_the_main_process():
    """A DataLoader iterator still alive at exit (kept by a traceback) makes multiprocessing SIGTERM its workers
    from the parent: they must take that one, or the main process waits for them forever."""
    import subprocess
    import sys
    script = (
        "import time, torch\nfrom util import signals\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "class Slow(Dataset):\n"
        "    def __len__(self): return 1000\n"
        "    def __getitem__(self, i): time.sleep(0.01); return torch.zeros(2)\n"
        "KEPT = iter(DataLoader(Slow(), batch_size=2, num_workers=2, worker_init_fn=signals.ignore_stop_signals))\n"
        "next(KEPT)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", script], cwd=repo, timeout=120).returncode == 0


def linear_task(tmp_path, steps, nan_at=None, optimizer="adamw"):
    """A linear model trained on `steps` batches of a 4-step epoch; the loss of step `nan_at` is NaN. Returns the model,
    the optimizer and the events of the run: ("forward", step) and ("read", step) in the order they happened."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = (torch.optim.AdamW(model.parameters(), lr=0.1, fused=True) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.1))
    events = []

    def forward(m, b):
        step = sum(1 for e in events if e[0] == "forward")
        events.append(("forward", step))
        loss = m(b[0]).pow(2).mean()
        return (loss * float("nan") if step == nan_at else loss), {"twice": 2 * loss.detach()}

    batches = [(torch.randn(2, 4, generator=torch.Generator().manual_seed(i)),) for i in range(steps)]
    ctx = loop_context(tmp_path, [])
    original_read = engine.StepMonitor._read

    def read(self, epoch, step, *rest):
        events.append(("read", step))
        return original_read(self, epoch, step, *rest)

    return model, opt, events, lambda: engine.train_one_epoch(model, forward, batches, opt, epoch=0, start_step=0,
                                                               steps_per_epoch=4, ctx=ctx), read


def test_each_step_is_read_on_the_host_one_step_late(tmp_path, monkeypatch):
    """No micro-step waits for its own loss: step t's record is read after step t+1's forward and backward
    (on a GPU the device has finished step t by then), the last one at the end of the epoch."""
    _, _, events, train, read = linear_task(tmp_path, 4)
    monkeypatch.setattr(engine.StepMonitor, "_read", read)
    stats = train()
    assert events == [("forward", 0), ("forward", 1), ("read", 0), ("forward", 2), ("read", 1), ("forward", 3),
                      ("read", 2), ("read", 3)]
    assert stats["twice"] == pytest.approx(2 * stats["loss"])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_non_finite_loss_never_reaches_the_weights(tmp_path, monkeypatch, optimizer):
    """Fused AdamW skips the update on the device (the host learns of it a step later); an optimizer that cannot
    skip is checked on the host before its update. Either way the weights and optimizer state are those after
    the last good step, and the error names the bad step."""
    good, good_opt, _, train_good, _ = linear_task(tmp_path, 2, optimizer=optimizer)
    train_good()
    bad, bad_opt, events, train_bad, read = linear_task(tmp_path, 4, nan_at=2, optimizer=optimizer)
    monkeypatch.setattr(engine.StepMonitor, "_read", read)
    with pytest.raises(engine.NonFiniteLossError, match="non-finite loss at epoch 0, step 2") as exc:
        train_bad()
    assert "No checkpoint of this run was written yet" in str(exc.value)  # engine.nonfinite_advice
    assert events[-1] == ("read", 2)
    assert_same_weights(good.state_dict(), bad.state_dict())
    if optimizer == "adamw":
        assert [s["step"].item() for s in bad_opt.state.values()] == [2.0, 2.0]
        assert_same_weights(good_opt.state_dict()["state"][0], bad_opt.state_dict()["state"][0])
