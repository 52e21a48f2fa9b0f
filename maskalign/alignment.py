"""Dynamic Alignment (paper section 3.3, docs/method.md steps 5-7): adaptors, the alignment matrix W,
target normalisation and the alignment loss.

Notation: S student blocks, T teacher blocks, K target levels (the last K teacher blocks).
`weight[i, j]` is w_ij of eq. (1): how much student block i contributes to teacher level j.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ALIGN_FORMS = ("dynamic", "official", "layerwise")
ADAPTORS = ("linear", "mlp")
TARGET_NORMS = ("ln", "bn", "l2", "none")
LOSS_TYPES = ("smooth_l1", "l1", "l2")


def relative_depth_map(src_depth: int, dst_depth: int) -> list[int]:
    """For each of `src_depth` blocks, the block of a `dst_depth`-deep model at the same relative depth.

    Block i covers depth (i + 1) / src_depth and maps to the first destination block that reaches that depth,
    so a 24-block student pairs up evenly on a 12-block teacher (0, 0, 1, 1, ...) and the last maps to the last.
    """
    return [max(0, math.ceil((i + 1) * dst_depth / src_depth) - 1) for i in range(src_depth)]


def init_alignment_matrix(student_depth: int, teacher_depth: int) -> torch.Tensor:
    """S x T: 1 where a student block and a teacher block sit at the same relative depth, plus 0.01.

    With S == T this is the reference code's `eye + 0.01`.
    """
    weight = torch.full((student_depth, teacher_depth), 0.01)
    for i, j in enumerate(relative_depth_map(student_depth, teacher_depth)):
        weight[i, j] += 1.0
    return weight


def make_adaptor(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":  # hidden size = student width (paper, Adaptation Details)
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    raise ValueError(f"adaptor must be one of {ADAPTORS}, got {kind!r}")


class DynamicAlignment(nn.Module):
    """Maps the S student block outputs to predictions of the K target teacher levels.

    - `dynamic` (eq. 1): yhat_j = sum_i w_ij A_i(x_i), one adaptor per student block.
    - `official` (reference code): yhat_j = A_j(sum_i w_ij x_i), mix first, one adaptor per target level.
    - `layerwise`: yhat_j = A_j(x_m(j)) with m the same-relative-depth map; no W.
    Only the K target levels are ever computed.
    """

    def __init__(self, student_dim: int, teacher_dim: int, student_depth: int, teacher_depth: int,
                 target_levels: Sequence[int], form: str = "dynamic", adaptor: str = "linear") -> None:
        super().__init__()
        if form not in ALIGN_FORMS:
            raise ValueError(f"alignment form must be one of {ALIGN_FORMS}, got {form!r}")
        self.form = form
        self.target_levels = list(target_levels)
        n_adaptors = student_depth if form == "dynamic" else len(self.target_levels)
        self.adaptors = nn.ModuleList(
            make_adaptor(adaptor, student_dim, teacher_dim) for _ in range(n_adaptors))
        if form == "layerwise":
            teacher_to_student = relative_depth_map(teacher_depth, student_depth)
            self.source_blocks = [teacher_to_student[j] for j in self.target_levels]
            self.weight = None
        else:
            self.weight = nn.Parameter(init_alignment_matrix(student_depth, teacher_depth))

    def forward(self, student_levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """S tensors B x n x Ds -> K x B x n x Dt (one prediction per target level)."""
        if self.form == "layerwise":
            return torch.stack([a(student_levels[i]) for a, i in zip(self.adaptors, self.source_blocks)])
        w = self.weight[:, self.target_levels]  # S x K
        if self.form == "dynamic":
            adapted = torch.stack([a(x) for a, x in zip(self.adaptors, student_levels)])
            return torch.einsum("sbnd,sk->kbnd", adapted, w.to(adapted.dtype))
        x = torch.stack(list(student_levels))
        mixed = torch.einsum("sbnd,sk->kbnd", x, w.to(x.dtype))
        return torch.stack([a(m) for a, m in zip(self.adaptors, mixed)])


def normalize_target(y: torch.Tensor, kind: str, eps: float = 1e-5) -> torch.Tensor:
    """Per-token target normalisation (eq. 2), without learnable affine. y: B x n x C."""
    if kind == "ln":
        return F.layer_norm(y, (y.shape[-1],), eps=eps)
    if kind == "bn":  # per channel over batch and tokens
        mean = y.mean(dim=(0, 1), keepdim=True)
        var = y.var(dim=(0, 1), unbiased=False, keepdim=True)
        return (y - mean) / torch.sqrt(var + eps)
    if kind == "l2":
        return F.normalize(y, dim=-1)
    if kind == "none":
        return y
    raise ValueError(f"target_norm must be one of {TARGET_NORMS}, got {kind!r}")


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over every element. smooth_l1 is eq. (3) with beta = 1 (the reference code doubles it)."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {kind!r}")
