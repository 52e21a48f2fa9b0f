"""Process-group setup from torchrun's (or SLURM/submitit's) environment, and small collective helpers.

No `--local_rank` flag is needed: torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("maskalign")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str, env: DistEnv | None = None, timeout_min: int = 30) -> DistEnv:
    """Join the process group (nccl on CUDA, gloo on CPU) when more than one process runs.

    `env` defaults to torchrun's variables; the SLURM launcher passes its own after exporting
    MASTER_ADDR / MASTER_PORT, so both paths share this code.
    """
    env = env or env_from_torchrun()
    if not env.enabled:
        return env
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(minutes=timeout_min))
    logger.info("process group: %s, rank %d of %d", backend, env.rank, env.world_size)
    return env


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In place across ranks (of `group`, default: all); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


def cpu_group(timeout_min: int = 30):
    """A gloo group of every process, for collectives of host-side values: the default group's NCCL
    collectives run on the device stream, so reading their result would wait for the GPU. None (the
    default group) when that is gloo already or in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_min))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
