"""What runs inside a submitit job (SLURM or submitit's local executor); submitit_launch.py submits it.

`TrainingJob` exports torchrun's variables from `submitit.JobEnvironment()`, runs the task's entry point with
`submitit_stop_policy` (preemption stops after a checkpoint; SIGTERM and SIGUSR1 only checkpoint), and hands
a stopped run to submitit's own requeue once the checkpoint is written. docs/slurm.md says who owns which
signal, and why.
"""
import dataclasses
import importlib
import os
import signal
import sys
import zlib
from typing import Any

import submitit
from submitit.core.logger import get_logger

from util.args import flag_value
from util.signals import StopPolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_STOPPED = 143  # the entry points' code for "stopped by a signal after writing checkpoint-latest"

logger = get_logger()  # submitit's: configured in the job before the entry point sets up its own logging


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    module: str               # get_args_parser(), parse_args(argv), main(args), run(argv, stop_policy)
    extra_argv: tuple = ()    # flags the task always adds (linear probing is main_finetune --linprobe)


TASKS: dict[str, EntryPoint] = {
    "pretrain": EntryPoint("main_pretrain"),
    "finetune": EntryPoint("main_finetune"),
    "linprobe": EntryPoint("main_finetune", ("--linprobe",)),
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


def submitit_stop_policy(preempt: int) -> StopPolicy:
    """While the loop runs: preemption stops it after a checkpoint, SIGTERM/SIGUSR1 only checkpoint."""
    return StopPolicy({signal.SIGUSR1: "save", signal.SIGTERM: "save", preempt: "stop"}, requeued_by_launcher=True)


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
        code = self._run(module, argv, submitit_stop_policy(preempt))
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

    def _run(self, module: Any, argv: list[str], stop_policy: StopPolicy) -> int:
        try:
            return module.run(argv, stop_policy=stop_policy)
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
