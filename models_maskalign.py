"""MaskAlign pre-training models (CVPR 2023, "Stare at What You See").

`MaskAlignViT` *is* the student: a timm `VisionTransformer` (same parameter names, so its weights load into
`timm.create_model('vit_base_patch16_224', num_classes=0)` unchanged) with fixed 2-D sin-cos position
embeddings, plus the Dynamic Alignment module under `dynamic_align.*`. The frozen teacher is held outside
the module tree: it is never in `state_dict()`, `parameters()`, the optimizer or DDP.

MAE-compatible call:  `loss, pred, mask = model(imgs, mask_ratio=0.7)`
  pred: K x B x n x C_teacher predictions of the K target levels (n = visible tokens, +1 with [CLS]);
  mask: B x N, 1 = dropped.

Factories `maskalign_vit_{tiny,small,base,large}_patch16` are registered with timm, so
`timm.create_model('maskalign_vit_base_patch16', teacher='openai/clip-vit-base-patch16',
teacher_weights='/path/ViT-B-16.pt')` works as well as MAE's `models_mae.__dict__[name](...)`.
"""
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from maskalign.alignment import (
    ADAPTORS,
    ALIGN_FORMS,
    LOSS_TYPES,
    TARGET_NORMS,
    DynamicAlignment,
    alignment_loss,
    normalize_target,
)
from maskalign.masking import (
    MASKINGS,
    MaskingRequest,
    check_mask_ratio,
    gather_tokens,
    mask_from_visible,
    num_visible,
)
from maskalign.pos_embed import sincos_2d_pos_embed
from maskalign.teacher_weights import build_teacher
from maskalign.teachers import Teacher

DEFAULT_TEACHER = "openai/clip-vit-base-patch16"

# Student architectures and the timm model their weights load into.
STUDENT_ARCHS = {
    "tiny": (dict(embed_dim=192, depth=12, num_heads=3), "vit_tiny_patch16_224"),
    "small": (dict(embed_dim=384, depth=12, num_heads=6), "vit_small_patch16_224"),
    "base": (dict(embed_dim=768, depth=12, num_heads=12), "vit_base_patch16_224"),
    "large": (dict(embed_dim=1024, depth=24, num_heads=16), "vit_large_patch16_224"),
}


@dataclass(frozen=True)
class MaskAlignConfig:
    """Every MaskAlign choice (docs/method.md); the defaults are the paper's. Validated on creation."""
    mask_type: str = "attentive"
    mask_ratio: float = 0.7
    top_k: int = 5
    align: str = "dynamic"
    adaptor: str = "linear"
    target_norm: str = "ln"
    loss_type: str = "smooth_l1"
    align_cls: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("mask_type", tuple(MASKINGS)), ("align", ALIGN_FORMS), ("adaptor", ADAPTORS),
                              ("target_norm", TARGET_NORMS), ("loss_type", LOSS_TYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        check_mask_ratio(self.mask_ratio)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (number of last teacher blocks to align), got {self.top_k}")

    @classmethod
    def pop_from(cls, kwargs: dict) -> "MaskAlignConfig":
        """Take this config's fields out of `kwargs` (a factory's keyword arguments)."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})


def check_teacher_fits(teacher: Teacher, grid_size: int, top_k: int, mask_type: str, align_cls: bool) -> None:
    """The teacher-dependent checks: depth, patch grid and [CLS] token."""
    if top_k > teacher.depth:
        raise ValueError(f"top_k={top_k} exceeds the teacher's depth ({teacher.depth} blocks); "
                         f"use top_k <= {teacher.depth}")
    teacher_grid = teacher.image_size // teacher.patch_size
    if teacher_grid != grid_size:
        raise ValueError(f"the teacher's patch grid ({teacher_grid}x{teacher_grid}) does not match the "
                         f"student's ({grid_size}x{grid_size}); build the teacher for the student's input size")
    if not teacher.has_cls_token:
        if MASKINGS[mask_type].needs_cls_attention:
            raise ValueError(f"{mask_type} masking needs a teacher with a [CLS] token; "
                             "use mask_type='random' or a teacher with a [CLS] token")
        if align_cls:
            raise ValueError("aligning [CLS] needs a teacher with a [CLS] token; set align_cls=False "
                             "(--no_align_cls) or use a teacher with a [CLS] token")


class MaskAlignViT(VisionTransformer):
    """Student ViT + Dynamic Alignment; aligns visible student features with a frozen teacher's."""

    def __init__(self, teacher: Teacher, config: Optional[MaskAlignConfig] = None, *, img_size: int = 224,
                 patch_size: int = 16, norm_pix_loss: bool = False, **kwargs: Any) -> None:
        """`config` fields may also be given as keyword arguments (MAE-style factories)."""
        # norm_pix_loss is accepted so MAE's engine can build this model; the targets are set by target_norm.
        del norm_pix_loss
        config = config or MaskAlignConfig.pop_from(kwargs)
        if img_size % patch_size:
            raise ValueError(f"input size {img_size} is not a multiple of the patch size {patch_size}")
        check_teacher_fits(teacher, img_size // patch_size, config.top_k, config.mask_type, config.align_cls)
        super().__init__(img_size=img_size, patch_size=patch_size, num_classes=0, **kwargs)
        self.__dict__["_teacher"] = teacher.eval()  # plain attribute: outside the module tree
        self.config = config
        self.target_levels = list(range(teacher.depth - config.top_k, teacher.depth))
        self.dynamic_align = DynamicAlignment(self.embed_dim, teacher.embed_dim, len(self.blocks), teacher.depth,
                                              self.target_levels, form=config.align, adaptor=config.adaptor)
        self.student_arch: Optional[str] = None  # timm name the student loads into; set by the factories
        self._init_maskalign_weights()
        # Pre-training aligns raw block outputs: the final norm takes no part (and DDP needs no unused params).
        self.norm.requires_grad_(False)

    @property
    def teacher(self) -> Teacher:
        return self.__dict__["_teacher"]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .cuda() / .half() must move the teacher that the module tree does not hold.
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def _init_maskalign_weights(self) -> None:
        """MAE's initialisation, which the paper and the reference code use."""
        grid = int(self.num_patches ** 0.5)
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(self.embed_dim, grid).unsqueeze(0), requires_grad=False)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dynamic_align.weight"}

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student alone, in timm's `VisionTransformer` layout (DA module dropped, paper section 3.3)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("dynamic_align.")}

    def forward_visible(self, imgs: torch.Tensor, ids_keep: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """Every block output ([CLS] + visible tokens) for the patches in `ids_keep` (all when None)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def sample_visible(self, batch_size: int, mask_ratio: float, cls_attention: Optional[torch.Tensor],
                       device: torch.device) -> torch.Tensor:
        request = MaskingRequest(batch_size, self.num_patches, num_visible(self.num_patches, mask_ratio), device,
                                 cls_attention)
        return MASKINGS[self.config.mask_type].sample(request)

    def targets(self, teacher_levels: dict[int, torch.Tensor], ids_keep: torch.Tensor,
                visible_levels: frozenset[int] = frozenset()) -> torch.Tensor:
        """K x B x n x C normalised teacher features at the visible positions ([CLS] first if aligned).

        Levels in `visible_levels` are already given at [CLS] + the visible patches only.
        """
        out = []
        first_patch = int(self.teacher.has_cls_token)
        norm = self.config.target_norm

        def pick(y: torch.Tensor) -> torch.Tensor:
            return torch.cat([y[:, :first_patch], gather_tokens(y[:, first_patch:], ids_keep)], dim=1)

        for level in self.target_levels:
            y = teacher_levels[level].float()
            if level in visible_levels:
                y = normalize_target(y, norm)
            elif norm != "bn":  # a per-token norm commutes with picking tokens: normalise fewer of them
                y = normalize_target(pick(y), norm)
            else:
                y = pick(normalize_target(y, norm))
            out.append(y if self.config.align_cls else y[:, first_patch:])
        return torch.stack(out)

    def forward(self, imgs: torch.Tensor, mask_ratio: Optional[float] = None,
                ids_keep: Optional[torch.Tensor] = None, return_level_losses: bool = False):
        """Returns (loss, pred, mask), plus the K per-level losses when `return_level_losses`.

        `ids_keep` (B x len_keep) fixes the visible patches instead of sampling them.
        """
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(mask_ratio)
        need_attention = ids_keep is None and MASKINGS[self.config.mask_type].needs_cls_attention and mask_ratio > 0

        def choose_visible(cls_attention: Optional[torch.Tensor]) -> torch.Tensor:
            if ids_keep is not None:
                return ids_keep
            if mask_ratio == 0:  # every patch kept: feature distillation
                return torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
            return self.sample_visible(imgs.shape[0], mask_ratio, cls_attention, imgs.device)

        with torch.no_grad():
            # "bn" targets need every token of every level: the teacher then computes its last block in full
            teacher_out = self.teacher(imgs, self.target_levels, need_cls_attention=need_attention,
                                       choose_visible=choose_visible, visible_only=self.config.target_norm != "bn")
        ids_keep = teacher_out.ids_keep
        pred = self.dynamic_align(self.forward_visible(imgs, ids_keep))
        if not self.config.align_cls:
            pred = pred[:, :, 1:]
        target = self.targets(teacher_out.levels, ids_keep, teacher_out.visible_levels)
        level_losses = torch.stack([alignment_loss(p.float(), t, self.config.loss_type) for p, t in zip(pred, target)])
        loss = level_losses.mean()
        mask = mask_from_visible(ids_keep, self.num_patches)
        if return_level_losses:
            return loss, pred, mask, level_losses
        return loss, pred, mask


_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create_maskalign(arch: str, pretrained: bool = False, teacher: Union[str, Teacher] = DEFAULT_TEACHER,
                     teacher_weights: Optional[str] = None, teacher_kwargs: Optional[dict] = None,
                     config: Optional[MaskAlignConfig] = None, **kwargs: Any) -> MaskAlignViT:
    """Build a MaskAlign model: student architecture `arch` (a key of STUDENT_ARCHS) and a teacher spec; the
    MaskAlign choices come as `config` or as its fields among `kwargs` (MAE-style)."""
    if pretrained:
        raise ValueError("there are no registered MaskAlign pre-training weights; build with pretrained=False "
                         "and load a checkpoint (main_pretrain.py --resume PATH)")
    for key in _TIMM_FACTORY_KWARGS:
        kwargs.pop(key, None)
    arch_cfg, timm_name = STUDENT_ARCHS[arch]
    config = config or MaskAlignConfig.pop_from(kwargs)  # validated before the (possibly slow) teacher is built
    cfg = {**arch_cfg, **kwargs}
    if isinstance(teacher, str):
        teacher = build_teacher(teacher, cfg.get("img_size", 224), cfg.get("patch_size", 16),
                                weights=teacher_weights, **(teacher_kwargs or {}))
    model = MaskAlignViT(teacher, config, **cfg)
    if kwargs.keys().isdisjoint({"embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio"}):
        model.student_arch = timm_name
    return model


def build_from_args(args: Any) -> MaskAlignViT:
    """The model that main_pretrain.py's flags describe (an argparse.Namespace, or a checkpoint's stored args
    read back into one). Raises ValueError for a teacher that cannot be built or cannot match the student."""
    config = MaskAlignConfig(**{f.name: getattr(args, f.name) for f in fields(MaskAlignConfig)})
    return globals()[args.model](
        teacher=args.teacher, teacher_weights=args.teacher_weights, teacher_kwargs=args.teacher_kwargs,
        img_size=args.input_size, drop_path_rate=args.drop_path, config=config, **args.model_kwargs)


def student_vit(model_name: str, **kwargs: Any) -> VisionTransformer:
    """The student of a registered MaskAlign model alone (no teacher, no DA), built from the same
    architecture arguments; entry points build it on the meta device to check --model_kwargs."""
    kwargs.pop("norm_pix_loss", None)
    arch_cfg, _ = STUDENT_ARCHS[model_name.split("_")[2]]  # maskalign_vit_<arch>[_patch16]
    return VisionTransformer(**{"num_classes": 0, **arch_cfg, **kwargs})


@register_model
def maskalign_vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> MaskAlignViT:
    return create_maskalign("tiny", pretrained, **kwargs)


@register_model
def maskalign_vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> MaskAlignViT:
    return create_maskalign("small", pretrained, **kwargs)


@register_model
def maskalign_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> MaskAlignViT:
    return create_maskalign("base", pretrained, **kwargs)


@register_model
def maskalign_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> MaskAlignViT:
    return create_maskalign("large", pretrained, **kwargs)


# MAE-style short names: models_maskalign.__dict__['maskalign_vit_base'] works like models_mae's.
maskalign_vit_tiny = maskalign_vit_tiny_patch16
maskalign_vit_small = maskalign_vit_small_patch16
maskalign_vit_base = maskalign_vit_base_patch16
maskalign_vit_large = maskalign_vit_large_patch16
