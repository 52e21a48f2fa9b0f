"""Which patches the student sees (docs/method.md, step 3): the masking strategies and their registry.

Every strategy returns `ids_keep`, a B x len_keep LongTensor of distinct patch indices (raster order of the
patch grid); `mask_from_visible` turns it into MAE's B x N mask (1 = dropped). A new strategy is one function
of a `MaskingRequest` plus one entry in `MASKINGS`; the model, the start-up checks and visualize.py read it.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """MAE's `len_keep = int(N * (1 - mask_ratio))`."""
    check_mask_ratio(mask_ratio)
    return int(num_patches * (1 - mask_ratio))


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(
            f"mask_ratio must be in [0, 1) (0 keeps every patch, i.e. feature distillation), got {mask_ratio}")


def random_visible(batch_size: int, num_patches: int, len_keep: int, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform sampling without replacement: MAE's argsort of uniform noise."""
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :len_keep]


def attentive_visible(importance: torch.Tensor, len_keep: int,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sampling without replacement with probability proportional to `importance` (B x N, >= 0).

    Gumbel-top-k draws exactly the distribution of `torch.multinomial(importance, N)[:, :len_keep]`
    (the reference code's sampler) in one vectorised top-k. Zero-importance patches stay selectable
    (after every positive one) so that any `len_keep <= N` is satisfiable.
    """
    log_p = importance.float().clamp_min(1e-30).log()
    uniform = torch.rand(log_p.shape, device=log_p.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return (log_p + gumbel).topk(len_keep, dim=1, sorted=False).indices


def mask_from_visible(ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """B x N float mask in patch order, 1 where the patch was dropped (MAE's convention)."""
    mask = torch.ones(ids_keep.shape[0], num_patches, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens B x N x C, ids B x n -> B x n x C."""
    return tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


@dataclass(frozen=True)
class MaskingRequest:
    """What a strategy may use to choose the visible patches of one batch."""
    batch_size: int
    num_patches: int
    len_keep: int
    device: torch.device
    cls_attention: Optional[torch.Tensor] = None  # B x N teacher [CLS] attention, given to strategies that need it
    generator: Optional[torch.Generator] = None


@dataclass(frozen=True)
class Masking:
    sample: Callable[[MaskingRequest], torch.Tensor]  # -> ids_keep
    needs_cls_attention: bool  # the teacher computes its last block's [CLS] attention row for it


MASKINGS: dict[str, Masking] = {
    "attentive": Masking(lambda r: attentive_visible(r.cls_attention, r.len_keep, r.generator),
                         needs_cls_attention=True),
    "random": Masking(lambda r: random_visible(r.batch_size, r.num_patches, r.len_keep, r.device, r.generator),
                      needs_cls_attention=False),
}
