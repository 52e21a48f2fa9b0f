"""The MaskAlign reference code's pre-training checkpoints in our layout. A leaf: util.checkpoint (resume)
and util.pretrained (fine-tuning, export) both read it."""
import torch
from torch import nn

# Keys of the reference code's checkpoints that are its teacher or its alignment, never the student.
REFERENCE_ONLY_PREFIXES = ("clip_model.", "dino_model.", "distill_heads.", "distill_weights")


def is_reference_pretraining(state: dict[str, torch.Tensor]) -> bool:
    return "distill_weights" in state


def reference_to_official(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The reference code's pre-training weights in the layout of our `--align official` model; ValueError
    when the model cannot hold them.

    Its `distill_weights` is indexed [teacher level, student block] (ours: W[i, j] = w_ij, the transpose) and
    it keeps one `distill_heads.j` per teacher block; ours keeps adaptors for the K target levels only.
    """
    align = getattr(model, "dynamic_align", None)
    if align is None or align.form != "official":
        raise ValueError("the reference code's checkpoints hold its mix-then-adapt alignment: "
                         "build the model with --align official (its --fusion_type linear)")
    out = {k: v for k, v in state.items() if not k.startswith(REFERENCE_ONLY_PREFIXES)}
    out["dynamic_align.weight"] = state["distill_weights"].t().contiguous()
    for k, level in enumerate(align.target_levels):
        prefix = f"distill_heads.{level}."
        heads = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
        if not heads:
            raise ValueError(f"the checkpoint has no distill_heads.{level} for target level {level}")
        out.update({f"dynamic_align.adaptors.{k}.{name}": v for name, v in heads.items()})
    return out
