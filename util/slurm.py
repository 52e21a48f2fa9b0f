"""What runs inside a submitit job (SLURM or submitit's local executor): see submitit_launch.py.

`TrainingJob` is the pickled callable. In the job it
1. exports torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) derived from
   `submitit.JobEnvironment()`, so the entry point's `init_distributed` runs exactly as under torchrun;
2. relies on the entry points' resume rule (`util.checkpoint.choose_resume`): the newest checkpoint of its
   `--output_dir` wins over any `--resume` of the first submission, so a requeued job, whether requeued by
   submitit or by SLURM itself, continues from the exact iteration;
3. runs the task's entry point (`run(argv) -> exit code`) under the submitit signal policy below, and hands a
   preempted / timed-out run to submitit's own requeue once the loop has saved and stopped.

Who owns which signal in a submitit job
---------------------------------------
submitit installs, before the callable runs: SIGUSR2 (its preemption/timeout signal, `SUBMITIT_PREEMPT_SIGNAL`;
SLURM sends it `--signal_delay_s` before the time limit and, on clusters with `send_user_signal`, on
preemption) -> `checkpoint_and_try_requeue`, which calls `checkpoint()`, requeues and `sys.exit`s *from inside
the signal handler*, i.e. mid-step; SIGTERM and SIGCONT -> logged and ignored.
While the training loop runs, `engine.StopSignals` owns the signals instead, remapped here (`actions`):
- the preemption signal -> "stop": every rank (all-reduced each step) writes checkpoint-latest at the next
  optimizer-step boundary and leaves the loop; `run` returns 143. Only then do we call submitit's saved handler
  ourselves, so `checkpoint()` + requeue happen after a clean save, never mid-step. Exit 143 in a submitit job
  therefore always means "preempted or timing out on some rank", and rank 0 requeues.
- SIGTERM -> "save" (checkpoint at the next step, keep training). SLURM sends SIGTERM on preemption (before or
  after USR2), on `scancel` and at the time limit, always followed by SIGKILL: stopping on it would end the job
  before USR2 arrives (no requeue), and requeueing on it would resurrect a cancelled job. Saving covers
  preemption without a user signal (PreemptMode=REQUEUE restarts the job, which resumes from that checkpoint).
- SIGUSR1 -> "save", as outside SLURM (avoid it for preemption: NCCL may use it).
Before the loop starts (data, model, teacher loading) and after it ends, submitit's handlers are in place: a
preemption then requeues at once; nothing has been trained since the checkpoint on disk, so nothing is lost.
"""
import contextlib
import dataclasses
import importlib
import os
import signal
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import submitit
from submitit.core.logger import get_logger

from util.args import flag_value

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_STOPPED = 143  # the entry points' code for "stopped by a signal after writing checkpoint-latest"

logger = get_logger()  # submitit's: configured in the job before the entry point sets up its own logging


@dataclasses.dataclass(frozen=True)
class Task:
    module: str               # entry-point module: get_args_parser(), parse_args(argv), main(args), run(argv)
    extra_argv: tuple = ()    # flags the task always adds (linear probing is main_finetune --linprobe)


TASKS: dict[str, Task] = {
    "pretrain": Task("main_pretrain"),
    "finetune": Task("main_finetune"),
    "linprobe": Task("main_finetune", ("--linprobe",)),
}


class TrainingFailed(RuntimeError):
    """The training ended with a non-zero exit code; submitit records it as the job's error."""


def entry_point(task: str) -> Any:
    """Imports the task's module only when needed (fine-tuning may not be in every checkout)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    try:
        return importlib.import_module(TASKS[task].module)
    except ModuleNotFoundError as e:
        if e.name != TASKS[task].module:
            raise
        raise ValueError(f"task {task!r} needs {TASKS[task].module}.py, which is not in {REPO}") from e


JOB_TAGS = ("%j", "%A", "%a")


def expand_job_tags(text: str, job_id: str) -> str:
    """SLURM's filename tags: %j the job id (`123` or `123_4` in an array), %A the array id, %a the index."""
    array_id, _, index = job_id.partition("_")
    return text.replace("%j", job_id).replace("%A", array_id).replace("%a", index or "0")


def master_port(job_id: str) -> int:
    """Same on every task of a job (and after a requeue, which keeps the id); differs between array tasks."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def torchrun_env(job_env: submitit.JobEnvironment) -> dict[str, str]:
    """torchrun's variables for this task; rank 0's node is the rendezvous host."""
    single_node = job_env.num_nodes == 1
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
        # one node: loopback, which resolves even where the hostname does not (containers, local runs)
        "MASTER_ADDR": "127.0.0.1" if single_node else job_env.hostnames[0],
        "MASTER_PORT": str(master_port(job_env.job_id)),
    }


def preempt_signal() -> int:
    return submitit.JobEnvironment._usr_sig()


@contextlib.contextmanager
def submitit_signal_policy(preempt: int) -> Iterator[None]:
    """While the loop runs: preemption stops it after a checkpoint, SIGTERM/SIGUSR1 only checkpoint."""
    from engine import StopSignals  # the entry points' loop; imported here so the launcher stays light

    previous = StopSignals.actions, StopSignals.requeued_by_launcher
    StopSignals.actions = {signal.SIGUSR1: "save", signal.SIGTERM: "save", preempt: "stop"}
    StopSignals.requeued_by_launcher = True
    try:
        yield
    finally:
        StopSignals.actions, StopSignals.requeued_by_launcher = previous


@dataclasses.dataclass
class TrainingJob:
    """submitit's callable: one training run of `task` with `argv` (which includes --output_dir)."""
    task: str
    argv: list[str]

    def __call__(self) -> dict[str, Any]:
        job_env = submitit.JobEnvironment()
        os.environ.update(torchrun_env(job_env))
        argv = [expand_job_tags(a, job_env.job_id) for a in self.argv]
        module = entry_point(self.task)
        logger.info("%s: running %s.run(%s)", job_env, module.__name__, argv)
        preempt = preempt_signal()
        with submitit_signal_policy(preempt):
            code = self._run(module, argv)
        if code == EXIT_STOPPED:
            self._requeue(preempt)  # rank 0 does not come back from this
            return {"exit_code": code, "rank": job_env.global_rank, "requeued": True}
        if code != 0:
            raise TrainingFailed(f"{self.task} exited with code {code} (1: non-finite loss or too many unreadable "
                                 f"images); see this job's log. Resubmitting resumes from the last checkpoint.")
        return {"exit_code": 0, "output_dir": flag_value(argv, "--output_dir"), "rank": job_env.global_rank}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit (rank 0) before requeueing. The loop has already written checkpoint-latest
        (or, if preempted outside the loop, the newest checkpoint on disk is still current); the requeued
        job finds it in its --output_dir (util.checkpoint.choose_resume), whatever --resume it was given."""
        logger.warning("requeueing %s; it resumes from the latest checkpoint in its --output_dir", self.task)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))

    def _run(self, module: Any, argv: list[str]) -> int:
        try:
            return module.run(argv)
        except SystemExit as e:
            # argparse (2) or a message from main: a recorded error rather than a silent exit. Any other code
            # is submitit's handler requeueing (preempted before or after the loop): let it through.
            if e.code == 2 or isinstance(e.code, str):
                raise TrainingFailed(f"{self.task} stopped at start-up: {e.code if e.code != 2 else 'bad flags'}; "
                                     f"see this job's log") from None
            raise

    @staticmethod
    def _requeue(preempt: int) -> None:
        """Hand over to the handler submitit installed for the preemption signal, now that the checkpoint is
        written: on rank 0 it calls checkpoint(), requeues and exits; on other ranks it returns."""
        handler = signal.getsignal(preempt)
        if not callable(handler):
            raise TrainingFailed("stopped for preemption but submitit's requeue handler is missing; "
                                 "checkpoint-latest is written: resubmit the same command to resume")
        signal.signal(preempt, signal.SIG_IGN)  # a second signal must not requeue twice
        handler(preempt, None)
