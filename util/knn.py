"""k-nearest-neighbour evaluation of a frozen backbone (the weighted vote of Wu et al. 2018, as DINO uses it).

Features are the backbone's pre-logits (what a linear probe sees), L2-normalised; each held-out image takes
the classes of its k most cosine-similar training images, weighted by exp(similarity / T).
"""
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x D L2-normalised float32 features, N labels) of a timm model built with num_classes=0."""
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(F.normalize(backbone(images.to(device)).float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Predicted class of every query row (features L2-normalised)."""
    num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_labels))
    similarity, index = (query_features @ train_features.T).topk(k, dim=1)
    votes = torch.zeros(len(query_features), num_classes)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return votes.argmax(dim=1)


def knn_top1(backbone: nn.Module, train_loader: Iterable, val_loader: Iterable, device: torch.device,
             k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of the k-NN classifier on the held-out loader."""
    train_features, train_labels = extract_features(backbone, train_loader, device)
    val_features, val_labels = extract_features(backbone, val_loader, device)
    predicted = knn_predict(train_features, train_labels, val_features, k, temperature)
    return 100.0 * (predicted == val_labels).float().mean().item()
