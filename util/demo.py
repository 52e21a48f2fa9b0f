"""The embedded default run: small real images and a small teacher, nothing downloaded.

Images: the photographs scikit-image ships in `skimage/data` (astronaut, coffee, chelsea, rocket, ...),
cut into random crops to make a few hundred training samples. Teacher: a ViT-Tiny/16 with a fixed random
initialisation saved to a local file (no hub weights can be fetched here); pass a real teacher with
`--teacher ... --teacher_weights FILE` for meaningful features.
"""
import logging
import os
import random

import torch
from PIL import Image

logger = logging.getLogger("maskalign")

DEMO_TEACHER = "timm:vit_tiny_patch16_224"
DEMO_DEFAULTS = dict(
    model="maskalign_vit_tiny_patch16", teacher=DEMO_TEACHER, input_size=64, batch_size=32, epochs=6,
    warmup_epochs=1, blr=8e-3, num_workers=2, save_freq=3, print_freq=4, device="cpu",
)
CROPS_PER_IMAGE = 12


def _shipped_images() -> list[str]:
    import skimage
    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    names = sorted(n for n in os.listdir(data_dir) if n.lower().endswith((".png", ".jpg")))
    return [os.path.join(data_dir, n) for n in names]


def prepare_demo_data(root: str, seed: int = 0) -> str:
    """Write an ImageFolder of random crops under root/train (once); returns root."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    rng = random.Random(seed)
    out_dir = os.path.join(root, "train", "skimage")
    os.makedirs(out_dir, exist_ok=True)
    for path in _shipped_images():
        img = Image.open(path).convert("RGB")
        side = min(img.size)
        if side < 64:
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        for k in range(CROPS_PER_IMAGE):
            size = rng.randint(side // 3, side)
            x, y = rng.randint(0, img.width - size), rng.randint(0, img.height - size)
            img.crop((x, y, x + size, y + size)).resize((96, 96)).save(os.path.join(out_dir, f"{stem}_{k}.png"))
    open(done, "w").close()
    logger.info("demo data: %d images in %s", len(os.listdir(out_dir)), out_dir)
    return root


def prepare_demo_teacher(path: str, seed: int = 0) -> str:
    """A seeded random ViT-Tiny/16 teacher saved as a plain state dict (once); returns its path."""
    if not os.path.exists(path):
        import timm
        torch.manual_seed(seed)
        model = timm.create_model(DEMO_TEACHER.split(":", 1)[1], pretrained=False)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(model.state_dict(), path)
    return path
