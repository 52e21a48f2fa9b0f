"""Hugging Face `transformers` weight files for the teachers: CLIP (`CLIPVisionModel`, `CLIPModel`) and ViT
(`ViTModel`, e.g. facebook/dino-vitb16; `ViTForImageClassification`), `.bin` or `.safetensors`.

The reference MaskAlign code loads its teachers this way, so many users have these files. They are renamed
(and q/k/v stacked) into the layouts our teachers run: open_clip's visual tower for CLIP, timm's
VisionTransformer for ViT. Only the image tower is kept; text towers, poolers and classifiers are dropped.
"""
from typing import Optional

import torch

CLIP_PREFIX = "vision_model."
_CLIP_MARK = "embeddings.patch_embedding.weight"  # under vision_model. in CLIPModel (and older CLIPVisionModel) files
_VIT_MARK = "embeddings.patch_embeddings.projection.weight"


def read_keys_and_tensors(path: str) -> dict[str, torch.Tensor]:
    """A weights file as a flat state dict: .safetensors, or a torch.save file read with weights_only=True."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:  # memory-mapped: looking at the keys of a large file costs little
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save files cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def hf_layout(state: dict[str, torch.Tensor]) -> Optional[str]:
    """'clip' for transformers' CLIP layouts, 'vit' for its ViT layouts, None for anything else."""
    if _CLIP_MARK in state or CLIP_PREFIX + _CLIP_MARK in state:
        return "clip"
    if _VIT_MARK in state or "vit." + _VIT_MARK in state:
        return "vit"
    return None


def _take_linear(out: dict, state: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"] = state[f"{src}.weight"]
    if f"{src}.bias" in state:
        out[f"{dst}.bias"] = state[f"{src}.bias"]


def _stack_qkv(out: dict, state: dict, names: tuple[str, str, str], weight_dst: str, bias_dst: str) -> None:
    out[weight_dst] = torch.cat([state[f"{n}.weight"] for n in names])
    out[bias_dst] = torch.cat([state[f"{n}.bias"] for n in names])


def clip_to_open_clip_visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP -> open_clip `model.visual` state dict (ln_post and proj included when present)."""
    prefix = CLIP_PREFIX if CLIP_PREFIX + _CLIP_MARK in state else ""
    src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {
        "class_embedding": src["embeddings.class_embedding"],
        "positional_embedding": src["embeddings.position_embedding.weight"],
        "conv1.weight": src["embeddings.patch_embedding.weight"],
    }
    _take_linear(out, src, "pre_layrnorm", "ln_pre")  # sic: transformers' name
    _take_linear(out, src, "post_layernorm", "ln_post")
    depth = 1 + max(int(k.split(".")[2]) for k in src if k.startswith("encoder.layers."))
    for i in range(depth):
        a, b = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        _stack_qkv(out, src, tuple(f"{a}.self_attn.{p}_proj" for p in "qkv"), f"{b}.attn.in_proj_weight",
                   f"{b}.attn.in_proj_bias")
        _take_linear(out, src, f"{a}.self_attn.out_proj", f"{b}.attn.out_proj")
        _take_linear(out, src, f"{a}.layer_norm1", f"{b}.ln_1")
        _take_linear(out, src, f"{a}.layer_norm2", f"{b}.ln_2")
        _take_linear(out, src, f"{a}.mlp.fc1", f"{b}.mlp.c_fc")
        _take_linear(out, src, f"{a}.mlp.fc2", f"{b}.mlp.c_proj")
    if "visual_projection.weight" in state:  # CLIPModel: nn.Linear(width, embed, bias=False) = x @ proj
        out["proj"] = state["visual_projection.weight"].T.contiguous()
    return out


def clip_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP -> open_clip's `visual.*` names, which timm's checkpoint filter converts itself."""
    return {f"visual.{k}": v for k, v in clip_to_open_clip_visual(state).items()}


def vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ViT (ViTModel, or ViTForImageClassification's `vit.*`) -> timm VisionTransformer."""
    src = {k[4:] if k.startswith("vit.") else k: v for k, v in state.items()}
    out = {
        "cls_token": src["embeddings.cls_token"],
        "pos_embed": src["embeddings.position_embeddings"],
    }
    _take_linear(out, src, "embeddings.patch_embeddings.projection", "patch_embed.proj")
    _take_linear(out, src, "layernorm", "norm")
    depth = 1 + max(int(k.split(".")[2]) for k in src if k.startswith("encoder.layer."))
    for i in range(depth):
        a, b = f"encoder.layer.{i}", f"blocks.{i}"
        _stack_qkv(out, src, tuple(f"{a}.attention.attention.{p}" for p in ("query", "key", "value")),
                   f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias")
        _take_linear(out, src, f"{a}.attention.output.dense", f"{b}.attn.proj")
        _take_linear(out, src, f"{a}.layernorm_before", f"{b}.norm1")
        _take_linear(out, src, f"{a}.layernorm_after", f"{b}.norm2")
        _take_linear(out, src, f"{a}.intermediate.dense", f"{b}.mlp.fc1")
        _take_linear(out, src, f"{a}.output.dense", f"{b}.mlp.fc2")
    return out
