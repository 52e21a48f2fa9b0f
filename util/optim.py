"""Optimizer parameter groups: weight-decay exemptions and layer-wise lr decay, and LARS for linear probing."""
from typing import Any, Sequence

import torch
import torch.nn as nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms (all 1-D params), cls/pos tokens and the DA matrix W."""
    skip = set(skip) | set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
