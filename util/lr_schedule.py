"""Per-iteration learning rate: linear warm-up, then half-cycle cosine down to `min_lr` (MAE's schedule)."""
import math


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """`epoch` is fractional: epoch + iteration / iterations_per_epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set every group's lr (times its `lr_scale`, used by layer-wise decay) and return the base lr."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
