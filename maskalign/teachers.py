"""The frozen teacher's computation, behind one interface for open_clip and timm ViTs.

A teacher sees the intact, ImageNet-normalised image on the student's patch grid and returns the residual
stream after the blocks the loss asks for, plus the last block's [CLS] attention for attentive masking.
Where its weights come from (specs, files, the hub) is `maskalign.teacher_weights`; docs/teachers.md has
the details.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import Attention as OpenClipAttention
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.layers import Attention as TimmAttention
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    def __init__(self, backbone: nn.Module, *, name: str, embed_dim: int, depth: int,
                 patch_size: int, grid_size: int, num_prefix_tokens: int, has_cls_token: bool,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.embed_dim = embed_dim
        self.depth = depth
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
        check_timm_vit(model, name)
        patch_size = _square(model.patch_embed.patch_size, name)
        _resample_timm_pos_embed(model, grid_size, patch_size)
        cfg = model.pretrained_cfg
        super().__init__(model, name=name, embed_dim=model.embed_dim, depth=len(model.blocks),
                         patch_size=patch_size, grid_size=grid_size,
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
        check_open_clip_vit(visual, name)
        patch_size = _square(visual.patch_size, name)
        _resample_open_clip_pos_embed(visual, grid_size, patch_size)
        blocks = visual.transformer.resblocks
        super().__init__(visual, name=name, embed_dim=visual.transformer.width, depth=len(blocks),
                         patch_size=patch_size, grid_size=grid_size,
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



def check_timm_vit(model: nn.Module, name: str) -> None:
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


def check_open_clip_vit(visual: nn.Module, name: str) -> None:
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

