"""Fixed 2-D sine-cosine position embeddings for the student ViT.

The layout matches MAE's (first half of the channels encodes the column, second half the row; the [CLS]
slot is all zeros), so position embeddings in MAE and MaskAlign checkpoints are interchangeable.
"""
import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) embedding: sin of the first dim/2 frequencies, then cos."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + grid_size**2, embed_dim) table for a square patch grid in raster order ([CLS] row first)."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
