"""Optimizer parameter groups: weight-decay exemptions and layer-wise lr decay, and LARS for linear probing."""
from collections.abc import Sequence
from typing import Any

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


def vit_layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for blocks.i, num_layers for everything above the last block."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float,
                             skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Layer-wise lr decay (BEiT / MAE fine-tuning): block i's lr is scaled by layer_decay ** (depth + 1 - (i + 1)).

    Every group carries an `lr_scale` that `util.lr_schedule.adjust_learning_rate` applies each step.
    """
    skip = set(skip) | set(getattr(model, "no_weight_decay", lambda: set())())
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name in skip)
        layer_id = vit_layer_id(name, num_layers)
        group = groups.setdefault((layer_id, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (num_layers - layer_id), "layer_id": layer_id})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as used for linear probing.

    The trust ratio ||w|| / ||g|| (weight decay included) scales updates of multi-dimensional weights only;
    biases and norm parameters take plain momentum SGD steps.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def adamw(param_groups: list[dict[str, Any]], lr: float, device: torch.device,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel (CUDA, CPU): faster, and it can skip a step on the device
    (`found_inf`), which lets the training loop guard against non-finite gradients without a host sync."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))
