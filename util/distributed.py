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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place across ranks; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
