"""Stop signals: which signal asks the training loop for a checkpoint ("save") or a checkpoint and a clean
stop ("stop"), and the guard that keeps data-loader workers alive through them. A launcher passes its own
`StopPolicy` to the entry point's `run(argv, stop_policy=...)` (util/slurm.py does); docs/training.md
describes the guarantees.
"""
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

logger = logging.getLogger("maskalign")


@dataclass(frozen=True)
class StopPolicy:
    actions: Mapping[int, str]  # signal number -> "save" or "stop"
    requeued_by_launcher: bool = False  # the launcher requeues a stopped job itself: messages then say so

    @property
    def worker_init_fn(self) -> Callable[[int], None]:
        """DataLoader `worker_init_fn` that keeps the workers alive through this policy's signals."""
        return functools.partial(ignore_stop_signals, stop_signals=frozenset(self.actions))


DEFAULT_POLICY = StopPolicy({signal.SIGUSR1: "save", signal.SIGTERM: "stop"})


@dataclass
class StopSignals:
    """The policy's handlers, installed for the training loop's lifetime.

    Handlers only raise *pending* requests, whenever the signal lands. Each micro-step hands the pending
    requests to one all-reduce among the hosts, and the loop acts only on the *agreed* result, which is the same
    on every rank at every step boundary even when the signal reached the ranks at different moments.
    """
    policy: StopPolicy = DEFAULT_POLICY
    pending_save: bool = False
    pending_stop: bool = False
    agreed_save: bool = False
    agreed_stop: bool = False
    _previous: dict = field(default_factory=dict)

    def install(self) -> "StopSignals":
        for sig, action in self.policy.actions.items():
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


def ignore_stop_signals(worker_id: int, stop_signals: frozenset[int] = frozenset(DEFAULT_POLICY.actions)) -> None:
    """DataLoader `worker_init_fn`. `scancel` and SLURM preemption signal every process of the job: the workers
    must keep loading until the main process has written its checkpoint at the next step (torch's own worker
    handler dies on SIGTERM). The stop signals are blocked and taken by a thread that drops them, except from
    the parent: its SIGTERM is how the DataLoader and multiprocessing end a worker (ignoring that would hang
    the main process at exit)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # this thread and every thread it starts
    threading.Thread(target=_drop_stop_signals, args=(set(stop_signals), os.getppid()), daemon=True).start()


def _drop_stop_signals(stop_signals: set, parent: int) -> None:
    while True:
        if signal.sigwaitinfo(stop_signals).si_pid == parent:
            os._exit(0)  # what torch's worker handler does on its parent's SIGTERM
