"""Frozen MaskAlign teachers behind one interface, for open_clip and timm ViTs.

The student sees ImageNet-normalised images at its own resolution. A teacher hides everything
that differs between teachers (its normalisation, its patch size, its library's internals), so the
loss code only asks for "the residual stream after block j, on the student's patch grid" and, for
attentive masking, the last block's [CLS] attention row.

Teacher specs accepted by :func:`build_teacher`:

* ``open_clip:<model>[:<tag or file>]``, e.g. ``open_clip:ViT-B-16:laion2b_s34b_b88k``.
  open_clip teachers need weights (a pretrained tag, a local file, or ``random``): open_clip would
  otherwise hand back a randomly initialised model without complaint. A tag whose weights were
  trained with QuickGELU (``openai`` and a few others) switches QuickGELU on even when the model
  name lacks ``-quickgelu``, because those weights in a GELU model give silently wrong features.
* ``timm:<model>[:<file>]``, e.g. ``timm:vit_base_patch16_224.dino``. Without weights, timm's
  pretrained weights for that tag are used. Any timm ``VisionTransformer`` with a [CLS] token works,
  also ones with register tokens (they are dropped from the outputs). timm has the same QuickGELU
  trap: OpenAI weights need its ``*_clip_quickgelu_*`` names.
* Aliases (``TEACHER_ALIASES``); the first name of each line is the reference code's flag value:

  - ``openai/clip-vit-base-patch16``, ``clip_b16``  -> ``open_clip:ViT-B-16-quickgelu:openai``
  - ``openai/clip-vit-large-patch14``, ``clip_l14`` -> ``open_clip:ViT-L-14-quickgelu:openai``
  - ``facebook/dino-vitb16``, ``dino_b16``          -> ``timm:vit_base_patch16_224.dino``

``weights`` (the training script's ``--teacher_weights``) replaces the weights named in the spec:
a local file (``.safetensors``; ``.pt``/``.pth``/``.bin`` read with ``weights_only=True``; OpenAI's
original TorchScript ``.pt`` files such as ``ViT-B-16.pt``), an open_clip pretrained tag, or
``none``/``random`` for a randomly initialised teacher (tests, benchmarks). A local file keeps the
spec's architecture, which is why the OpenAI aliases name the QuickGELU models. open_clip files hold
the full CLIP state dict (open_clip's or OpenAI's; the text tower is dropped after loading), timm
files the model's state dict (a classifier head is ignored; OpenAI/open_clip/DINOv2 layouts are
converted by timm). Hugging Face `transformers` files (`CLIPModel` / `CLIPVisionModel` for CLIP,
`ViTModel` for DINO; `.bin` or `.safetensors`) are converted on load (maskalign/hf_weights.py). A loaded
file is logged as "loaded teacher weights from FILE (N tensors)".

Hub weights come through the Hugging Face cache. Offline (``HF_HUB_OFFLINE=1``) only cached files
can be used; anything else fails at once, asking for a local file via ``--teacher_weights``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import huggingface_hub
import open_clip
import timm
import torch
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from open_clip.transformer import Attention as OpenClipAttention
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.layers import Attention as TimmAttention
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from maskalign import hf_weights

logger = logging.getLogger("maskalign")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


class TeacherOutput(NamedTuple):
    """What one teacher pass returns.

    levels: block index (0-based) -> B x (1+N) x C residual stream after that block, before any
        final norm; [CLS] first, then the N patch tokens in raster order (B x N x C for a teacher
        without [CLS]).
    cls_attention: B x N float32 attention of the last block's [CLS] query to the patch keys
        (softmax over all keys, then the patch columns), averaged over heads; None unless asked.
    ids_keep: B x n patch indices returned by `choose_visible` (None without it).
    visible_levels: the levels given only at [CLS] + the patches of ids_keep (B x (1+n) x C, in that order),
        not at every token.
    """

    levels: dict[int, torch.Tensor]
    cls_attention: Optional[torch.Tensor]
    ids_keep: Optional[torch.Tensor] = None
    visible_levels: frozenset[int] = frozenset()


class TeacherSpec(NamedTuple):
    """A teacher spec after alias resolution; weights is None, RANDOM_WEIGHTS, a tag or a path."""

    library: str
    model_name: str
    weights: Optional[str]


class _AttentionParts(NamedTuple):
    """What the [CLS] attention row needs from a block; both libraries stack q, k, v row-wise."""

    norm: nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    q_norm: nn.Module
    k_norm: nn.Module
    num_heads: int
    scale: float


class Teacher(nn.Module):
    """A frozen ViT that sees the intact image on the student's patch grid.

    Subclasses wrap one library's ViT (``backbone``) and provide its blocks, its token embedding and
    the weights of its attention; the shared forward pass runs only the blocks a request needs.
    The teacher is never trained: parameters are frozen, ``train()`` keeps it in eval mode and
    ``forward`` runs without autograd.
    """

    def __init__(self, backbone: nn.Module, *, name: str, embed_dim: int, depth: int, num_heads: int,
                 patch_size: int, grid_size: int, num_prefix_tokens: int, has_cls_token: bool,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.image_size = grid_size * patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.has_cls_token = has_cls_token
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # ImageNet-normalised input -> teacher-normalised input is one per-channel affine map.
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        t_mean, t_std = torch.tensor(self.mean), torch.tensor(self.std)
        self.register_buffer("input_scale", (in_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((in_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)
        self.compute_dtype: Optional[torch.dtype] = None  # see set_compute_dtype
        self.requires_grad_(False)
        super().train(False)

    @property
    def blocks(self) -> nn.Module:
        """The transformer blocks in order (an nn.Sequential or nn.ModuleList)."""
        raise NotImplementedError

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Teacher-normalised pixels -> B x (prefix + N) x C tokens entering the first block."""
        raise NotImplementedError

    def _attention_parts(self, block: nn.Module) -> _AttentionParts:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode whatever a parent module asks: the teacher's targets must not change."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, levels: Sequence[int], need_cls_attention: bool = False,
                choose_visible: Optional[Callable[[Optional[torch.Tensor]], torch.Tensor]] = None,
                visible_only: bool = True) -> TeacherOutput:
        """ImageNet-normalised B x 3 x H x W images -> the requested levels (see TeacherOutput).

        Blocks after the last requested level are skipped unless the [CLS] attention, which lives in
        the last block, is asked for. `choose_visible(cls_attention)` -> B x n patch indices is called once
        the [CLS] attention is known; with `visible_only` the final block then computes its queries,
        attention output and MLP only for [CLS] + those patches (its keys and values still come from every
        token, so these rows equal the full block's), and its level is returned at those rows only.
        """
        wanted = self._check_request(levels, need_cls_attention)
        last = self.depth - 1 if need_cls_attention else max(wanted)
        blocks = self.blocks
        with self._compute_autocast(images.device):
            x = self._embed(self._to_teacher_pixels(images))
            out: dict[int, torch.Tensor] = {}
            for i in range(last):
                x = self._run_block(blocks[i], x)
                if i in wanted:
                    out[i] = self._cls_and_patches(x)
            final = _FinalBlock(self, blocks[last], x)
            cls_attention = final.cls_attention() if need_cls_attention else None
            ids_keep = choose_visible(cls_attention) if choose_visible is not None else None
            rows_only = (ids_keep is not None and visible_only and last in wanted
                         and ids_keep.shape[1] < self.grid_size ** 2)
            if rows_only:
                out[last] = final.visible_rows(ids_keep)
            elif last in wanted:
                out[last] = self._cls_and_patches(self._run_block(blocks[last], x))
        return TeacherOutput(out, cls_attention, ids_keep, frozenset({last}) if rows_only else frozenset())

    def _check_request(self, levels: Sequence[int], need_cls_attention: bool) -> frozenset[int]:
        wanted = frozenset(int(level) for level in levels)
        if not wanted and not need_cls_attention:
            raise ValueError("ask the teacher for at least one level or for the [CLS] attention")
        bad = sorted(level for level in wanted if not 0 <= level < self.depth)
        if bad:
            raise ValueError(f"teacher {self.name} has blocks 0..{self.depth - 1}; levels {bad} do not exist")
        if need_cls_attention and not self.has_cls_token:
            raise ValueError(f"teacher {self.name} has no [CLS] token, so it has no [CLS] attention; "
                             "use random masking or a teacher with a [CLS] token")
        return wanted

    def _to_teacher_pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.input_scale + self.input_shift
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=False)
        return x

    def _cls_and_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Drop register/distillation tokens so every teacher returns [CLS] + patches."""
        if self.num_prefix_tokens == int(self.has_cls_token):
            return x
        patches = x[:, self.num_prefix_tokens:]
        return torch.cat([x[:, :1], patches], dim=1) if self.has_cls_token else patches

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One whole block (its own forward unless a subclass computes it better)."""
        return block(x)

    def _block_from_parts(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The whole block computed batch-first from its parts: one q/k/v projection GEMM over every token,
        then fused attention (F.scaled_dot_product_attention), output projection and MLP."""
        parts = self._attention_parts(block)
        normed = parts.norm(x)
        q, k, v = (_split_heads(t, parts.num_heads)
                   for t in F.linear(normed, parts.qkv_weight, parts.qkv_bias).chunk(3, dim=-1))
        heads = F.scaled_dot_product_attention(parts.q_norm(q), parts.k_norm(k), v, scale=parts.scale)
        return self._rows_output(block, x, normed, heads)

    def _rows_output(self, block: nn.Module, rows: torch.Tensor, normed_rows: torch.Tensor,
                     heads: torch.Tensor) -> torch.Tensor:
        """The block's output at `rows` (B x n x C block input) from its attention at those rows
        (`heads`: B x H x n x head_dim, before any head scale and the output projection)."""
        raise NotImplementedError

    def set_compute_dtype(self, dtype: Optional[torch.dtype]) -> Teacher:
        """Keep the matmul weights (Linear, Conv, attention in-projection) once in `dtype` and run the
        forward under autocast to it, instead of casting the frozen weights on every step. Under an
        autocast to the same dtype the numbers are those of the float32 weights; norms stay float32."""
        self.compute_dtype = dtype
        if dtype is None:
            return self
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
            elif isinstance(module, nn.MultiheadAttention) or (
                    isinstance(module, OpenClipAttention) and module.in_proj_weight is not None):
                module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
                if module.in_proj_bias is not None:
                    module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
        return self

    def _compute_autocast(self, device: torch.device):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"name={self.name}, image_size={self.image_size}, patch_size={self.patch_size}, "
                f"grid_size={self.grid_size}, depth={self.depth}, embed_dim={self.embed_dim}")


class _FinalBlock:
    """The last block a teacher pass runs, split so that its [CLS] attention row, and then its output at
    [CLS] + the chosen patches only, share one key/value projection of every token."""

    def __init__(self, teacher: Teacher, block: nn.Module, x: torch.Tensor) -> None:
        self.teacher, self.block, self.x = teacher, block, x
        self.parts = teacher._attention_parts(block)
        dim = self.parts.qkv_weight.shape[0] // 3
        self._slices = [slice(0, dim), slice(dim, 2 * dim), slice(2 * dim, 3 * dim)]
        self._normed: Optional[torch.Tensor] = None
        self._keys: Optional[torch.Tensor] = None

    @property
    def normed(self) -> torch.Tensor:
        if self._normed is None:
            self._normed = self.parts.norm(self.x)
        return self._normed

    @property
    def keys(self) -> torch.Tensor:
        if self._keys is None:
            self._keys = self.parts.k_norm(_split_heads(self._project(self.normed, 1), self.parts.num_heads))
        return self._keys

    def _project(self, h: torch.Tensor, which: int) -> torch.Tensor:
        """0: queries, 1: keys, 2: values (both libraries stack q, k, v row-wise)."""
        rows = self._slices[which]
        bias = None if self.parts.qkv_bias is None else self.parts.qkv_bias[rows]
        return F.linear(h, self.parts.qkv_weight[rows], bias)

    def _queries(self, h: torch.Tensor) -> torch.Tensor:
        return self.parts.q_norm(_split_heads(self._project(h, 0), self.parts.num_heads))

    def cls_attention(self) -> torch.Tensor:
        """Only the [CLS] query row: O(N) instead of the O(N^2) full attention map."""
        q, k = self._queries(self.normed[:, :1]), self.keys
        with torch.autocast(device_type=self.x.device.type, enabled=False):  # sampling weights want fp32
            logits = (q.float() @ k.float().transpose(-1, -2)) * self.parts.scale  # B x H x 1 x L
        return logits.softmax(dim=-1).mean(dim=1)[:, 0, self.teacher.num_prefix_tokens:]

    def visible_rows(self, ids_keep: torch.Tensor) -> torch.Tensor:
        """The block's output at [CLS] (if any) + the patches of ids_keep, in that order."""
        values = _split_heads(self._project(self.normed, 2), self.parts.num_heads)
        queries = self._queries(self._rows(self.normed, ids_keep))
        heads = F.scaled_dot_product_attention(queries, self.keys, values, scale=self.parts.scale)
        return self.teacher._rows_output(self.block, self._rows(self.x, ids_keep),
                                         self._rows(self.normed, ids_keep), heads)

    def _rows(self, t: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        patches = t[:, self.teacher.num_prefix_tokens:]
        patches = patches.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return torch.cat([t[:, :1], patches], dim=1) if self.teacher.has_cls_token else patches


class TimmTeacher(Teacher):
    """A timm VisionTransformer (patch_embed, _pos_embed, patch_drop, norm_pre, blocks).

    Takes ownership of ``model``: its position embedding is resampled in place to ``grid_size``.
    mean/std default to the model's pretrained_cfg.
    """

    def __init__(self, model: TimmVisionTransformer, grid_size: int, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, name: str = "timm") -> None:
        _check_timm_vit(model, name)
        patch_size = _square(model.patch_embed.patch_size, name)
        _resample_timm_pos_embed(model, grid_size, patch_size)
        cfg = model.pretrained_cfg
        super().__init__(model, name=name, embed_dim=model.embed_dim, depth=len(model.blocks),
                         num_heads=model.blocks[0].attn.num_heads, patch_size=patch_size, grid_size=grid_size,
                         num_prefix_tokens=model.num_prefix_tokens, has_cls_token=model.cls_token is not None,
                         mean=mean or cfg["mean"], std=std or cfg["std"])

    @property
    def blocks(self) -> nn.Module:
        return self.backbone.blocks

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit._pos_embed(vit.patch_embed(pixels.to(vit.pos_embed.dtype)))
        return vit.norm_pre(vit.patch_drop(x))

    def _attention_parts(self, block: nn.Module) -> _AttentionParts:
        attn = block.attn
        return _AttentionParts(block.norm1, attn.qkv.weight, attn.qkv.bias, attn.q_norm, attn.k_norm,
                               attn.num_heads, attn.scale)

    def _rows_output(self, block: nn.Module, rows: torch.Tensor, normed_rows: torch.Tensor,
                     heads: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        o = _merge_heads(heads)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(normed_rows).sigmoid()
        x = rows + block.ls1(attn.proj(attn.norm(o)))  # drop path and dropout: identity in eval mode
        return x + block.ls2(block.mlp(block.norm2(x)))


class OpenClipTeacher(Teacher):
    """An open_clip visual tower (conv1, class_embedding, positional_embedding, ln_pre, resblocks).

    Takes ownership of ``visual``: its position embedding is resampled in place to ``grid_size``.
    Levels are resblock outputs; ln_post and the projection are never used.
    """

    def __init__(self, visual: OpenClipVisionTransformer, grid_size: int,
                 mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
                 std: Sequence[float] = open_clip.OPENAI_DATASET_STD, name: str = "open_clip") -> None:
        _check_open_clip_vit(visual, name)
        patch_size = _square(visual.patch_size, name)
        _resample_open_clip_pos_embed(visual, grid_size, patch_size)
        blocks = visual.transformer.resblocks
        super().__init__(visual, name=name, embed_dim=visual.transformer.width, depth=len(blocks),
                         num_heads=blocks[0].attn.num_heads, patch_size=patch_size, grid_size=grid_size,
                         num_prefix_tokens=1, has_cls_token=True, mean=mean, std=std)

    @property
    def blocks(self) -> nn.Module:
        return self.backbone.transformer.resblocks

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        # Patch dropout is left out on purpose: it is the identity in eval mode.
        visual = self.backbone
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # nn.MultiheadAttention projects q, k, v on a sequence-first view of the tokens; torch.compile turns that
        # projection into a batched matmul with one small GEMM per token position (1.7x the time of one GEMM
        # on CPU). Computed batch-first from the same weights, the block is one projection GEMM + fused attention.
        if isinstance(block.attn, nn.MultiheadAttention):
            return self._block_from_parts(block, x)
        return block(x)

    def _attention_parts(self, block: nn.Module) -> _AttentionParts:
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            return _AttentionParts(block.ln_1, attn.in_proj_weight, attn.in_proj_bias, nn.Identity(),
                                   nn.Identity(), attn.num_heads, attn.head_dim ** -0.5)
        return _AttentionParts(block.ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.ln_q, attn.ln_k,
                               attn.num_heads, attn.scale)

    def _rows_output(self, block: nn.Module, rows: torch.Tensor, normed_rows: torch.Tensor,
                     heads: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            o = attn.out_proj(_merge_heads(heads))
        else:
            if attn.head_scale is not None:
                heads = heads * attn.head_scale
            o = block.ln_attn(attn.out_proj(attn.ln_inner(_merge_heads(heads))))
        x = rows + block.ls_1(o)
        return x + block.ls_2(block.mlp(block.ln_2(x)))


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


def _check_timm_vit(model: nn.Module, name: str) -> None:
    """Reject what the teacher cannot run: it relies on timm's pre-norm Block/Attention and abs pos embed."""
    if not (isinstance(model, TimmVisionTransformer) and isinstance(model.patch_embed, PatchEmbed)
            and model.pos_embed is not None):
        raise ValueError(f"teacher {name} ({type(model).__name__}) is not a ViT with a patch embedding and an "
                         "absolute position embedding; use a timm VisionTransformer such as "
                         "vit_base_patch16_224.dino")
    odd = {type(b).__name__ for b in model.blocks
           if not (isinstance(b, TimmBlock) and isinstance(b.attn, TimmAttention))}
    if odd:
        raise ValueError(f"teacher {name} uses blocks {sorted(odd)}; only timm's standard Block with "
                         "Attention is supported")


def _check_open_clip_vit(visual: nn.Module, name: str) -> None:
    """Reject towers the teacher cannot run: ResNets, timm/HF towers, scaled-cosine attention, LND layout."""
    if not isinstance(visual, OpenClipVisionTransformer):
        raise ValueError(f"teacher {name} has a {type(visual).__name__} image tower, not open_clip's "
                         "VisionTransformer with patch and absolute position embeddings; use e.g. ViT-B-16")
    for block in visual.transformer.resblocks:
        attn = block.attn
        plain = (isinstance(block, ResidualAttentionBlock) and isinstance(attn, nn.MultiheadAttention)
                 and attn.batch_first and attn.in_proj_weight is not None)
        custom = (isinstance(block, CustomResidualAttentionBlock) and isinstance(attn, OpenClipAttention)
                  and attn.logit_scale is None)
        if not (plain or custom):
            raise ValueError(f"teacher {name}: unsupported attention block {type(block).__name__} "
                             f"({type(attn).__name__}); needs batch-first attention without scaled cosine")


def _student_grid(img_size: int, patch_size: int) -> int:
    if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
        raise ValueError(f"student image size {img_size} is not divisible by the student patch size "
                         f"{patch_size}; choose an input size that is a multiple of the patch size")
    return img_size // patch_size


def _square(patch_size: int | Sequence[int], name: str) -> int:
    """The teacher's grid can only be matched to the student's square grid with square patches."""
    sizes = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"teacher {name} has non-square patches {sizes}; its grid cannot be matched to "
                         "the student's square grid")
    return int(sizes[0])


def _resample(pos_embed: torch.Tensor, old_grid: Sequence[int], grid_size: int, num_prefix: int) -> nn.Parameter:
    """Bicubic, no antialias: the same resampling the image gets; prefix ([CLS]) positions are kept."""
    new = resample_abs_pos_embed(pos_embed, new_size=[grid_size, grid_size], old_size=list(old_grid),
                                 num_prefix_tokens=num_prefix, interpolation="bicubic", antialias=False)
    return nn.Parameter(new, requires_grad=False)


def _resample_timm_pos_embed(model: TimmVisionTransformer, grid_size: int, patch_size: int) -> None:
    old_grid = tuple(model.patch_embed.grid_size)
    model.patch_embed.set_input_size(img_size=grid_size * patch_size)
    if old_grid != (grid_size, grid_size):
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed = _resample(model.pos_embed.data, old_grid, grid_size, num_prefix)


def _resample_open_clip_pos_embed(visual: OpenClipVisionTransformer, grid_size: int, patch_size: int) -> None:
    old_grid = tuple(visual.grid_size)
    if old_grid != (grid_size, grid_size):
        new = _resample(visual.positional_embedding.data[None], old_grid, grid_size, num_prefix=1)
        visual.positional_embedding = nn.Parameter(new[0], requires_grad=False)
    visual.grid_size = (grid_size, grid_size)
    visual.image_size = (grid_size * patch_size, grid_size * patch_size)


def _split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, dim = t.shape
    return t.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * head_dim)


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
    _check_open_clip_vit(model.visual, label)
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
    _check_timm_vit(model, label)
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


def is_hub_tag(spec: TeacherSpec) -> bool:
    return hub_source(spec) is not None


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
