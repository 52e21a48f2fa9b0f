"""Where a teacher's weights come from: spec strings and aliases, local files, the Hugging Face hub.

`build_teacher(spec, ...)` turns `--teacher` / `--teacher_weights` into a frozen `maskalign.teachers.Teacher`.
Every problem a user can fix (an unknown spec, a missing file, an offline hub) is a ValueError naming what to
pass instead. docs/teachers.md lists the accepted specs, files and aliases.
"""
from __future__ import annotations

import logging
import os
import socket
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import huggingface_hub
import open_clip
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from maskalign import hf_weights
from maskalign.teachers import OpenClipTeacher, Teacher, TimmTeacher, check_open_clip_vit, check_timm_vit

logger = logging.getLogger("maskalign")

RANDOM_WEIGHTS = "random"
WEIGHTS_FLAG = "--teacher_weights"

TEACHER_ALIASES: dict[str, str] = {
    "openai/clip-vit-base-patch16": "open_clip:ViT-B-16-quickgelu:openai",
    "openai/clip-vit-large-patch14": "open_clip:ViT-L-14-quickgelu:openai",
    "facebook/dino-vitb16": "timm:vit_base_patch16_224.dino",
    "clip_b16": "open_clip:ViT-B-16-quickgelu:openai",
    "clip_l14": "open_clip:ViT-L-14-quickgelu:openai",
    "dino_b16": "timm:vit_base_patch16_224.dino",
}
_LIBRARIES = ("open_clip", "timm")


class TeacherSpec(NamedTuple):
    """A teacher spec after alias resolution; weights is None, RANDOM_WEIGHTS, a tag or a path."""

    library: str
    model_name: str
    weights: Optional[str]



def resolve_teacher_spec(spec: str, weights: Optional[str] = None) -> TeacherSpec:
    """Turn a spec or alias plus the optional weights override into library, model and weights."""
    library, _, rest = TEACHER_ALIASES.get(spec, spec).partition(":")
    model_name, _, spec_weights = rest.partition(":")
    if library not in _LIBRARIES or not model_name:
        raise ValueError(f"unknown teacher {spec!r}: use 'open_clip:<model>[:<tag or file>]', "
                         f"'timm:<model>[:<file>]' or one of the aliases {sorted(TEACHER_ALIASES)}")
    chosen = weights or spec_weights or None
    if chosen is not None and chosen.lower() in ("none", RANDOM_WEIGHTS):
        chosen = RANDOM_WEIGHTS
    return TeacherSpec(library, model_name, chosen)


def build_teacher(spec: str, student_img_size: int, student_patch_size: int, weights: Optional[str] = None,
                  **model_kwargs: Any) -> Teacher:
    """Build the frozen teacher for a student of the given image and patch size.

    ``model_kwargs`` go to ``timm.create_model`` / ``open_clip.create_model`` (e.g. small test models).
    Raises ValueError for anything the user can fix: spec, weights, sizes, architecture, offline hub.
    """
    grid_size = _student_grid(student_img_size, student_patch_size)
    resolved = resolve_teacher_spec(spec, weights)
    build = _build_open_clip if resolved.library == "open_clip" else _build_timm
    return build(resolved.model_name, resolved.weights, grid_size, model_kwargs)



def _student_grid(img_size: int, patch_size: int) -> int:
    if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
        raise ValueError(f"student image size {img_size} is not divisible by the student patch size "
                         f"{patch_size}; choose an input size that is a multiple of the patch size")
    return img_size // patch_size



# ----------------------------------------------------------------------------- open_clip

def _build_open_clip(model_name: str, weights: Optional[str], grid_size: int, model_kwargs: dict) -> Teacher:
    label = f"open_clip:{model_name}"
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models() "
                         "(ViT names such as ViT-B-16, ViT-L-14, ViT-B-16-quickgelu)")
    if weights is None:
        raise ValueError(f"teacher {label} needs weights: a pretrained tag "
                         f"({_open_clip_tags(model_name)}), a local file via {WEIGHTS_FLAG} PATH, "
                         f"or '{RANDOM_WEIGHTS}'")
    tag_cfg = {} if weights == RANDOM_WEIGHTS else open_clip.get_pretrained_cfg(model_name, weights)
    fetch = _open_clip_fetcher(model_name, weights, tag_cfg, label)
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    model = open_clip.create_model(model_name, pretrained=None, **{"force_quick_gelu": quick_gelu, **model_kwargs})
    check_open_clip_vit(model.visual, label)
    if fetch is not None:
        _load_open_clip_weights(model, fetch(), label)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    return OpenClipTeacher(model.visual, grid_size, mean=tag_cfg.get("mean", preprocess["mean"]),
                           std=tag_cfg.get("std", preprocess["std"]), name=label)


def _open_clip_fetcher(model_name: str, weights: str, tag_cfg: dict, label: str) -> Optional[Callable[[], str]]:
    """How to get the weights file; checked before building so that a bad request fails fast."""
    if weights == RANDOM_WEIGHTS:
        return None
    if tag_cfg:
        return _hub_fetcher(*_open_clip_hub_files(tag_cfg), label)
    if os.path.isfile(weights):
        return lambda: weights
    raise ValueError(f"{weights!r} is neither a pretrained tag of {label} ({_open_clip_tags(model_name)}) "
                     f"nor an existing file")


def _open_clip_tags(model_name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return "tags: " + ", ".join(tags) if tags else "no pretrained tags"


def _load_open_clip_weights(model: nn.Module, path: str, label: str) -> None:
    try:
        state = _torchscript_state_dict(path)
        hf_state = _hf_state(path, "clip") if state is None else None
        if hf_state is not None:  # transformers' CLIP: the image tower alone
            count = _load_open_clip_visual(model.visual, hf_weights.clip_to_open_clip_visual(hf_state))
        elif state is None:
            open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
            count = len(model.state_dict())
        else:  # OpenAI's names are open_clip's names
            model.load_state_dict(state, strict=True)
            count = len(state)
    except Exception as e:  # re-raised with the model and file, whatever the loader tripped on
        raise ValueError(f"cannot load {path} into teacher {label} (a full open_clip CLIP state dict, OpenAI's "
                         f".pt or a transformers CLIPModel/CLIPVisionModel file is expected): {e}") from e
    _log_loaded(path, count, label)


def _load_open_clip_visual(visual: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Strict, except for the projection, which a CLIPVisionModel file lacks and the teacher never uses."""
    result = visual.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "proj"]
    if missing or result.unexpected_keys:
        raise ValueError(f"missing keys {missing}, unexpected keys {result.unexpected_keys}")
    return len(state)


def _hf_state(path: str, expected: str) -> Optional[dict[str, torch.Tensor]]:
    """The file's state dict if it is in a transformers layout (CLIP or ViT), else None; a transformers
    file of the other family is refused with what to use instead."""
    if path.endswith((".safetensors", ".bin", ".pt", ".pth")):
        state = hf_weights.read_keys_and_tensors(path)
        layout = hf_weights.hf_layout(state) if isinstance(state, dict) else None
        if layout == expected or (layout == "clip" and expected == "vit"):
            return state
        if layout is not None:
            raise ValueError("this is a transformers ViT file (DINO-style); use a timm teacher, e.g. "
                             "--teacher facebook/dino-vitb16")
    return None


def _log_loaded(path: str, count: int, label: str) -> None:
    # The last word after open_clip's "No pretrained weights loaded ... initialized randomly" (it was built
    # empty on purpose, then filled from the file).
    logger.info("loaded teacher weights from %s (%d tensors) into %s", path, count, label)


# ----------------------------------------------------------------------------- timm

def _build_timm(model_name: str, weights: Optional[str], grid_size: int, model_kwargs: dict) -> Teacher:
    label = f"timm:{model_name}"
    _check_timm_name(model_name)
    fetch = _timm_fetcher(model_name, weights, label)
    model = timm.create_model(model_name, pretrained=False, **{"num_classes": 0, **model_kwargs})
    check_timm_vit(model, label)
    if fetch is not None:
        _load_timm_weights(model, fetch(), label)
    return TimmTeacher(model, grid_size, name=label)


def _check_timm_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models('vit_*', pretrained=True)")
    try:
        timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as e:
        raise ValueError(f"unknown pretrained tag in timm model {model_name!r}: {e}") from e


def _timm_fetcher(model_name: str, weights: Optional[str], label: str) -> Optional[Callable[[], str]]:
    """How to get the weights file; checked before building so that a bad request fails fast."""
    if weights == RANDOM_WEIGHTS:
        return None
    if weights is not None:
        if not os.path.isfile(weights):
            raise ValueError(f"teacher weights file {weights!r} does not exist (timm teachers take a local "
                             f"file, '{RANDOM_WEIGHTS}', or nothing for timm's pretrained weights)")
        return lambda: weights
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm has no hub weights for {model_name}; pass a local file with {WEIGHTS_FLAG} PATH")
    return _hub_fetcher(*_timm_hub_files(cfg), label)


def _load_timm_weights(model: TimmVisionTransformer, path: str, label: str) -> None:
    try:
        state = _torchscript_state_dict(path)
        if state is None:
            hf_state = _hf_state(path, "vit")
            if hf_state is None:
                state = timm.models.load_state_dict(path, use_ema=False, weights_only=True)
            elif hf_weights.hf_layout(hf_state) == "vit":
                state = hf_weights.vit_to_timm(hf_state)
            else:
                state = hf_weights.clip_to_timm(hf_state)
        state = checkpoint_filter_fn(state, model)  # converts e.g. OpenAI CLIP, open_clip and DINOv2 layouts
        if isinstance(model.head, nn.Identity):  # the teacher never classifies
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        model.load_state_dict(state, strict=True)
    except Exception as e:  # re-raised with the model and file, whatever the loader tripped on
        raise ValueError(f"cannot load {path} into teacher {label}: {e}") from e
    _log_loaded(path, len(state), label)


def _torchscript_state_dict(path: str) -> Optional[dict[str, torch.Tensor]]:
    """The weights of a TorchScript archive (OpenAI's original CLIP .pt files), else None.

    ``torch.load(weights_only=True)`` refuses such archives; TorchScript loading unpickles no Python
    objects, so it is as safe. OpenAI's archives carry three int entries that are not weights.
    """
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("/constants.pkl") for name in archive.namelist()):
            return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated")
        state = torch.jit.load(path, map_location="cpu").state_dict()
    return {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}


# ----------------------------------------------------------------------------- hub

def _hub_filenames(filename: str) -> list[str]:
    """Prefer the safetensors twin of a pickle file, as open_clip and timm do."""
    if filename.endswith(".safetensors"):
        return [filename]
    twins = {"pytorch_model.bin": "model.safetensors",
             open_clip.constants.HF_WEIGHTS_NAME: open_clip.constants.HF_SAFE_WEIGHTS_NAME}
    return [twins.get(filename, os.path.splitext(filename)[0] + ".safetensors"), filename]


def _open_clip_hub_files(tag_cfg: dict) -> tuple[str, list[str]]:
    repo_id, filename = os.path.split(tag_cfg["hf_hub"])  # 'org/repo/' means the default file name
    return repo_id, _hub_filenames(filename or open_clip.constants.HF_WEIGHTS_NAME)


def _timm_hub_files(cfg: Any) -> tuple[str, list[str]]:
    return cfg.hf_hub_id, _hub_filenames(cfg.hf_hub_filename or "pytorch_model.bin")


def hub_source(spec: TeacherSpec) -> Optional[tuple[str, list[str]]]:
    """(repo id, candidate file names) when the teacher's weights come from the Hugging Face hub (an
    open_clip pretrained tag; a timm model without a weights file), else None (a local file, random)."""
    if spec.weights == RANDOM_WEIGHTS:
        return None
    if spec.library == "open_clip":
        tag_cfg = open_clip.get_pretrained_cfg(spec.model_name, spec.weights) if spec.weights else {}
        return _open_clip_hub_files(tag_cfg) if tag_cfg.get("hf_hub") else None
    if spec.weights is not None:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(spec.model_name)
    except RuntimeError:  # an unknown tag: reported when the teacher is built
        return None
    return _timm_hub_files(cfg) if cfg is not None and cfg.hf_hub_id else None


def cached_hub_file(repo_id: str, filenames: list[str]) -> Optional[str]:
    """The first of `filenames` found in the local Hugging Face cache (no network)."""
    for filename in filenames:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return cached
    return None


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or huggingface_hub.constants.HF_HUB_OFFLINE


HUB_CONNECT_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's host (or to the HTTPS proxy in between), in at most `timeout`
    seconds. Without it, a machine with no internet learns so only after the HTTP client's retries."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy or huggingface_hub.constants.ENDPOINT)
    if not url.hostname:
        return True  # nothing to probe: let the download decide
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_fetcher(repo_id: str, filenames: list[str], label: str) -> Callable[[], str]:
    """A cached file is used as is (no network); offline, or with no route to the hub, a missing file
    fails now, not after retries."""
    cached = cached_hub_file(repo_id, filenames)
    if cached is not None:
        return lambda: cached
    if _hub_offline():
        raise ValueError(f"the weights of teacher {label} ({repo_id}) are not in the Hugging Face cache and "
                         f"the hub is offline (HF_HUB_OFFLINE). Download them on a machine with internet "
                         f"access and pass the local file with {WEIGHTS_FLAG} PATH")
    if not hub_reachable():
        raise ValueError(f"the weights of teacher {label} ({repo_id}) are not in the Hugging Face cache and "
                         f"the hub ({huggingface_hub.constants.ENDPOINT}) cannot be reached from this machine. "
                         f"Download them on a machine with internet access and pass the local file with "
                         f"{WEIGHTS_FLAG} PATH (and set HF_HUB_OFFLINE=1 on machines without internet)")
    return lambda: _download(repo_id, filenames, label)


def _download(repo_id: str, filenames: list[str], label: str) -> str:
    error: Optional[Exception] = None
    for filename in filenames:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename)
        except LocalEntryNotFoundError as e:  # no connection: the other names would fail the same way
            error = e
            break
        except Exception as e:  # this name is missing on the hub: try the next one
            error = e
    raise ValueError(f"cannot download the weights of teacher {label} from the Hugging Face hub ({repo_id}): "
                     f"{error}. Without internet access, download them elsewhere and pass the local file "
                     f"with {WEIGHTS_FLAG} PATH") from error

