"""Checkpoints in MAE's layout (`model`, `optimizer`, `scaler`, `epoch`, `args`) plus what exact
resumption needs (`resume_epoch`, `resume_step`, `global_step`).

Written atomically (temp file + rename) so a job killed mid-write never leaves a corrupt file, and loaded
with `weights_only=True` so a checkpoint cannot run code. Every way a file can be unusable (missing, truncated,
corrupt, holding code, full disk) ends in a `CheckpointError` whose one-line message names the file.
"""
import argparse
import errno
import glob
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from util.reference_weights import is_reference_pretraining, reference_to_official

logger = logging.getLogger("maskalign")

LATEST = "checkpoint-latest.pth"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


TEMP_SUFFIX = ".tmp."  # `<file>.tmp.<pid>` while a write is in progress


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """Write `path` through a temp file and a rename, so the previous file stays whole until the new one is.

    A failed write removes its temp file; a full disk (or quota) ends in one line with the space needed.
    """
    write_atomic({path: lambda tmp: torch.save(obj, tmp)}, needed=lambda: tensor_bytes(obj))


def copy_atomic(source: str, path: str) -> None:
    write_atomic({path: lambda tmp: shutil.copyfile(source, tmp)}, needed=lambda: os.path.getsize(source))


def write_atomic(writes: dict[str, Callable[[str], Any]], needed: Callable[[], int], what: str = "the checkpoint",
                 advice: str = "Free space, then resume") -> None:
    """Write every path of `writes` (path -> function writing a given file) through its own temp file, then
    rename them all. A failed write leaves every path as it was, and no temp file (the renames that follow the
    writes are each atomic, not all together). A full disk (or quota) ends in a `CheckpointError` whose one line
    says how much `what` needs and ends with `advice`."""
    temps = {path: f"{path}{TEMP_SUFFIX}{os.getpid()}" for path in writes}
    try:
        for path, write in writes.items():
            write(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        directory = os.path.dirname(os.path.abspath(next(iter(writes))))  # every caller writes into one directory
        if isinstance(e, Exception) and _out_of_space(e, directory, needed()):
            raise CheckpointError(
                f"no space left on device in {directory}: {what} needs {needed() / 2**20:.0f} MB "
                f"({shutil.disk_usage(directory).free / 2**20:.0f} MB free); {_none_of(writes)} written and the "
                f"files already there are intact. {advice}") from e
        raise


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in `obj` (each storage counted once): what the file needs, give or take the pickle."""
    storages: dict[int, int] = {}

    def walk(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, dict):
            for value in item.values():
                walk(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                walk(value)

    walk(obj)
    return sum(storages.values())


def _none_of(paths: Sequence[str]) -> str:
    names = [os.path.basename(p) for p in paths]
    return f"{names[0]} was not" if len(names) == 1 else f"none of {', '.join(names)} was"


def _out_of_space(error: Exception, directory: str, needed: int) -> bool:
    if isinstance(error, OSError):  # it carries the reason
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    try:  # torch's C++ writer reports a full disk as "unexpected pos ...", without the errno
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def remove_stale_temp_files(directory: str, patterns: Sequence[str] = ("*.pth",)) -> None:
    """Temp files of writes that were killed (SIGKILL, a lost node) would pile up over requeues and fill
    the disk; only rank 0 writes, and nothing is being written when a run starts. `patterns`: glob patterns
    of the files whose temp files to remove."""
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(directory), f"{pattern}{TEMP_SUFFIX}*")):
            if re.search(r"\.tmp\.\d+$", path) and os.path.isfile(path):
                size = os.path.getsize(path)
                os.remove(path)
                logger.warning("removed %s (%.0f MB), left by an interrupted write", path, size / 2**20)


# MAE's and the reference MaskAlign code's `save_model` store `args` as an argparse.Namespace: a plain
# attribute bag, safe to rebuild, so it is the one class allowed beyond tensors and containers.
_SAFE_CLASSES = [argparse.Namespace]


# What the weights-only unpickler says when a file asks for code, as opposed to bytes that make no sense.
_CODE_MARKERS = ("GLOBAL", "allowlisted", "unrecognized function")


def load(path: str) -> dict[str, Any]:
    """A `.pth` (tensors and plain containers only: anything that would need pickle to run code is refused)
    or a `.safetensors` file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals(_SAFE_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from e
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1]
        if any(marker in detail for marker in _CODE_MARKERS):
            raise CheckpointError(
                f"refusing to load {path}: it holds objects that are not plain tensors/containers (loading it "
                f"would execute code: {_first_sentence(detail)}). Re-save its state dicts as plain data") from e
        raise _unreadable(path, detail) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # what torch raises on cut or damaged bytes
        raise _unreadable(path, str(e) or type(e).__name__) from e


def _load_safetensors(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except SafetensorError as e:
        raise _unreadable(path, str(e)) from e


def _unreadable(path: str, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({os.path.getsize(path)} bytes; "
                           f"{_first_sentence(detail)}): copy it again, or move it away to use an older checkpoint")


def _first_sentence(text: str) -> str:
    """torch's messages run over several lines of advice; the first sentence says what is wrong."""
    line = next((row.strip() for row in text.splitlines() if row.strip()), "")
    return line.split(". ")[0].rstrip(".")


def numbered_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{epoch}.pth")


def find_resume(output_dir: Optional[str]) -> Optional[str]:
    """The file to auto-resume from: checkpoint-latest.pth if present, else the highest numbered one."""
    if not output_dir:
        return None
    latest = os.path.join(output_dir, LATEST)
    if os.path.isfile(latest):
        return latest
    numbered = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth"))
                if (m := re.search(r"checkpoint-(\d+)\.pth$", p))]
    return max(numbered)[1] if numbered else None


def choose_resume(resume: str, output_dir: Optional[str]) -> Optional[str]:
    """This run's own checkpoint-latest wins over --resume: rerunning (or requeueing) the same command must
    continue where it stopped, not go back to the file it first started from."""
    latest = find_resume(output_dir)
    if resume and latest and os.path.abspath(latest) != os.path.abspath(resume):
        logger.warning("resuming from %s, the latest checkpoint of this run, not --resume %s", latest, resume)
    return latest or resume or None


def training_state(model, optimizer, scaler, args, *, epoch_done: int, resume_epoch: int, resume_step: int,
                   global_step: int, world_size: int, extra: Optional[dict] = None) -> dict[str, Any]:
    """`epoch` keeps MAE's meaning (last completed epoch, so MAE's loader resumes at epoch + 1).

    `extra` holds task state (e.g. `model_ema`, `max_accuracy`) stored at the top level.
    """
    return {
        **(extra or {}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch_done,
        "resume_epoch": resume_epoch,
        "resume_step": resume_step,
        "global_step": global_step,
        "world_size": world_size,
        "args": dict(vars(args)),
    }


def _load_with_model(path: str) -> dict[str, Any]:
    ckpt = load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} holds no training state (no 'model' entry): --resume takes a checkpoint "
                              f"written by this code, MAE or the reference code; pass weights with --finetune")
    return ckpt


def load_strict(model, state: dict[str, Any], path: str, flags: str) -> None:
    """`model.load_state_dict(state)` for weights read from `path`; `flags` names the flags that shape the
    model, for the one-line message when the two do not match."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        problems = [line.strip()[:160] for line in str(e).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{path} does not match this model (was it written with other {flags} flags?): "
                              f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}") from e


def restore_training_state(path: str, model, optimizer, scaler) -> tuple[int, int, dict[str, Any]]:
    """Load model/optimizer/scaler; returns (epoch, step within it, the whole checkpoint) to continue from."""
    ckpt = _load_with_model(path)
    state = ckpt["model"]
    if is_reference_pretraining(state):
        try:
            state, optimizer, scaler = reference_to_official(state, model), None, None
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        logger.warning("%s is a reference-code checkpoint: weights converted, optimizer state starts afresh", path)
    load_strict(model, state, path, "--model, --model_kwargs, --teacher, --top_k or --align")
    if "optimizer" in ckpt and optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    epoch = ckpt.get("resume_epoch", ckpt["epoch"] + 1)
    step = ckpt.get("resume_step", 0)
    logger.info("resumed from %s at epoch %d, step %d", path, epoch, step)
    return epoch, step, ckpt


def step_for_batch(ckpt: dict[str, Any], step: int, batch_size: int, world_size: int) -> int:
    """Where to continue an epoch when the per-rank batch or the number of ranks changed since `ckpt`.

    The ranks shard one permutation, so `step` micro-steps covered its first step * batch * world samples.
    The new run starts at the step that covers as many (rounded down: a few samples are seen twice).
    """
    old_batch = ckpt.get("args", {}).get("batch_size", batch_size)
    old_world = ckpt.get("world_size", world_size)
    consumed = step * old_batch * old_world
    new_step, leftover = divmod(consumed, batch_size * world_size)
    if (old_batch, old_world) != (batch_size, world_size):
        logger.warning("batch %d x %d ranks -> %d x %d since the checkpoint: continuing the epoch at step %d%s",
                       old_batch, old_world, batch_size, world_size, new_step,
                       f" ({leftover} samples seen again)" if leftover else "")
    return new_step
