"""WebDataset-format tar shards (`<key>.jpg` + `<key>.cls`) read by random access: indexed once (from the
`<shard>.idx.json` make_shards.py writes, else by walking the tar headers) and read with one `pread` per
sample, so they plug into the same resumable sampler as an ImageFolder. docs/data.md explains why.
"""
import json
import logging
import os
import re
import resource
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("maskalign.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
INDEX_SUFFIX = ".idx.json"
NO_LABEL = -1  # shards without .cls members (fine for pre-training, which ignores labels)


@dataclass(frozen=True)
class ShardMember:
    """Where one image lies inside a shard."""
    shard: str
    offset: int
    size: int
    name: str

    def __str__(self) -> str:  # what the bad-sample log names
        return f"{self.shard}:{self.name}"


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar a-001.tar a-002.tar (zero padding kept); ``{x,y}`` lists; nested."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [path for option in options for path in expand_braces(head + option + tail)]


def is_shard_spec(data_path: str, split: Optional[str] = None) -> bool:
    """A brace pattern, a .tar file, or a folder (or its ``split`` sub-folder) holding .tar files."""
    return ("{" in data_path or data_path.endswith(".tar") or bool(_tars_in(data_path))
            or (split is not None and bool(_tars_in(os.path.join(data_path, split)))))


def missing_shards(data_path: str) -> list[str]:
    """Files a brace pattern names that do not exist (for flag validation)."""
    return [p for p in expand_braces(data_path) if not os.path.isfile(p)]


def _tars_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar"))


def shard_paths(data_path: str, split: Optional[str] = None) -> list[str]:
    """The shard files ``data_path`` names: a brace pattern, one .tar, or the .tar files of a folder (its
    ``split`` sub-folder first, as with an ImageFolder)."""
    if "{" in data_path:
        paths = expand_braces(data_path)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {data_path} do not exist, e.g. {missing[0]}")
        return paths
    if data_path.endswith(".tar"):
        return [data_path]
    if split is not None and _tars_in(os.path.join(data_path, split)):
        return _tars_in(os.path.join(data_path, split))
    paths = _tars_in(data_path)
    if not paths:
        raise ValueError(f"No .tar shards in {data_path}")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset keys: everything before the first dot of the file name; the rest is the extension."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(folder, key), ext.lower()


def scan_shard(path: str) -> list[tuple[str, int, int, int]]:
    """(image member name, data offset, size, label) per sample, in tar order; a truncated tail is dropped
    with a warning (its complete samples are kept)."""
    entries: list[tuple[str, int, int, int]] = []
    current_key, image, label = None, None, NO_LABEL

    def flush():
        if image is not None:
            entries.append((*image, label))

    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        end = os.fstat(f.fileno()).st_size
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key != current_key:
                    flush()
                    current_key, image, label = key, None, NO_LABEL
                if member.offset_data + member.size > end:
                    raise tarfile.ReadError("member extends past the end of the file")
                if ext in IMAGE_EXTENSIONS and image is None:
                    image = (member.name, member.offset_data, member.size)
                elif ext == "cls":
                    label = int(tar.extractfile(member).read().decode().strip())
        except (tarfile.ReadError, EOFError) as e:
            logger.warning("Shard %s is truncated or damaged after %d samples (%s); using those", path,
                           len(entries), e)
            return entries
    flush()
    return entries


def write_index(shard: str, entries: Sequence[tuple[str, int, int, int]]) -> None:
    """The sidecar that saves readers from walking the tar headers (one small read per member)."""
    with open(shard + INDEX_SUFFIX, "w") as f:
        json.dump({"tar_bytes": os.path.getsize(shard), "samples": list(entries)}, f)


def read_index(shard: str) -> list[tuple[str, int, int, int]]:
    """The sidecar's entries when it matches the shard's size, else a fresh scan."""
    sidecar = shard + INDEX_SUFFIX
    if os.path.isfile(sidecar):
        try:
            with open(sidecar) as f:
                index = json.load(f)
            if index["tar_bytes"] == os.path.getsize(shard):
                return [tuple(e) for e in index["samples"]]
            logger.warning("Index %s does not match its shard (rewritten?); scanning the shard", sidecar)
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("Unreadable index %s (%s); scanning the shard", sidecar, e)
    return scan_shard(shard)


def index_shards(paths: Sequence[str]) -> list[tuple[ShardMember, int]]:
    """(member, label) for every sample of every shard, shards in the given order."""
    samples = []
    for path in paths:
        samples += [(ShardMember(path, offset, size, name), label) for name, offset, size, label in read_index(path)]
    if not samples:
        raise ValueError(f"No images in the {len(paths)} shard(s) starting with {paths[0]}")
    return samples


class _OpenShards:
    """Shard files kept open per process (forked workers must not share a parent's descriptors: the
    file position is shared, and pread avoids it, but a process id check is cheaper than reasoning)."""

    def __init__(self) -> None:
        self.pid = None
        self.files: OrderedDict[str, int] = OrderedDict()
        self.capacity = 0

    def read(self, member: ShardMember) -> bytes:
        if self.pid != os.getpid():
            self.pid, self.files, self.capacity = os.getpid(), OrderedDict(), _descriptor_budget()
        fd = self.files.get(member.shard)
        if fd is None:
            if len(self.files) >= self.capacity:
                os.close(self.files.popitem(last=False)[1])
            fd = self.files[member.shard] = os.open(member.shard, os.O_RDONLY)
        else:
            self.files.move_to_end(member.shard)
        data = os.pread(fd, member.size, member.offset)
        if len(data) != member.size:
            raise OSError(f"short read: {len(data)} of {member.size} bytes (shard changed since it was indexed?)")
        return data


def _descriptor_budget() -> int:
    """Open shards per process: up to half the descriptor limit (raised to the hard limit first), so that
    every shard of ImageNet (~1300 files) stays open without starving the rest of the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(16, min(soft, 1 << 20) // 2)


_open_shards = _OpenShards()


def read_bytes(source) -> bytes:
    """The encoded image of a sample: a file path or a `ShardMember`."""
    if isinstance(source, ShardMember):
        return _open_shards.read(source)
    with open(source, "rb") as f:
        return f.read()
