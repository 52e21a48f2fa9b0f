"""Deterministic data order and augmentation, so that a run resumed mid-epoch sees exactly the samples
(and the random crops) the uninterrupted run would have seen, whatever the number of workers.
"""
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class ResumableDistributedSampler(Sampler[int]):
    """DistributedSampler-style sharding of one seeded permutation per epoch, able to start mid-epoch.

    Rank r takes positions r, r + W, r + 2W, ... of the permutation, so W ranks with batch B see the same
    samples as one process with batch W * B. With ``tag_epoch`` it yields (epoch, index) pairs, which carry
    the epoch to `PerSampleSeeded` in persistent DataLoader workers (their dataset copy never sees set_epoch).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, tag_epoch: bool = False) -> None:
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.tag_epoch = seed, shuffle, tag_epoch
        self.epoch, self.start = 0, 0
        self.per_rank = num_samples // world_size  # drop the tail so every rank has the same count

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start`: samples of this rank's shard already consumed (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        shard = order[self.rank:self.per_rank * self.world_size:self.world_size][self.start:].tolist()
        return iter([(self.epoch, i) for i in shard] if self.tag_epoch else shard)

    def __len__(self) -> int:
        return self.per_rank - self.start


class PerSampleSeeded(Dataset):
    """Seeds torch / random / numpy from (seed, epoch, index) around each sample's augmentation.

    The augmentation of sample i in epoch e is then a pure function of (seed, e, i): it no longer depends
    on which worker loads it or on how far the run got before a restart. The index may be an (epoch, i) pair
    (`ResumableDistributedSampler(tag_epoch=True)`), which overrides `set_epoch`.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # read by workers forked when the next epoch's iterator starts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # expose the wrapped dataset's counters (num_bad, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        sample_seed = hash((self.seed, epoch, index)) % (2 ** 31)
        if get_worker_info() is not None:
            # a DataLoader worker's RNGs serve only its samples, each seeded afresh: saving and restoring
            # them (~0.1-0.2 ms per sample, mostly numpy's) would buy nothing
            _seed_cpu_rngs(sample_seed)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            _seed_cpu_rngs(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _seed_cpu_rngs(seed: int) -> None:
    # the CPU generator alone: torch.manual_seed would also queue a lazy CUDA seeding call, with a formatted
    # stack trace, in every worker that never initialises CUDA (slow, and the queue grows)
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
