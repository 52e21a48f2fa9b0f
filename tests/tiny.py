"""Tiny CPU pre-training setups shared by the test modules: a 3-block teacher, a 2-block student, 32 px images."""
import os

import numpy as np
import torch
from PIL import Image

from util import checkpoint

TINY_TEACHER = dict(depth=3, embed_dim=48, num_heads=3)


def register_open_clip_config(folder, name, embed_dim=16, **vision):
    """Make open_clip know a tiny CLIP `name` (ViT image tower `vision`, a one-layer text tower)."""
    import json

    import open_clip
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    (folder / f"{name}.json").write_text(json.dumps(dict(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)))
    open_clip.add_model_config(folder)


def make_images(root, n=24, size=40, seed=0):
    """An ImageFolder of random RGB images under root/train (two classes)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = root / "train" / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    return root


def pretrain_argv(data, out, teacher_file, *extra):
    """main_pretrain flags for a 2-epoch, 6-steps-per-epoch run of the tiny setup."""
    return ["--model", "maskalign_vit_tiny_patch16", "--teacher", "timm:vit_tiny_patch16_224",
            "--teacher_weights", teacher_file, "--data_path", str(data), "--output_dir", str(out),
            "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-2",
            "--num_workers", "0", "--device", "cpu", "--top_k", "3", "--print_freq", "100",
            "--model_kwargs", "depth=2", "embed_dim=64", "num_heads=2",
            "--teacher_kwargs", *[f"{k}={v}" for k, v in TINY_TEACHER.items()], *extra]


def weights(out):
    return checkpoint.load(os.path.join(out, checkpoint.LATEST))["model"]


def determined(state):
    """The weights whose training the arithmetic determines, for comparing runs with different batch layouts or
    thread counts. Left out: the attention key bias (the middle third of `qkv.bias`). It adds the same q.b_k to
    every logit of a query, which softmax ignores, so its gradient is zero up to rounding; AdamW divides each
    gradient by its own running RMS and turns that rounding noise, whose sign follows the summation order of
    the CPU's kernels, into steps as large as anyone's. It never changes an output either way."""
    out = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            query, _, val = value.chunk(3)
            value = torch.cat([query, val])
        out[key] = value
    return out


def assert_same_weights(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def make_photos(root, n=24, size=(96, 72), classes=2, seed=0, quality=90):
    """An ImageFolder of JPEG crops of scikit-image's shipped photos under root/train (natural image statistics,
    which random noise lacks, for the data-pipeline tests)."""
    from benchmarks.photos import shipped_photos
    photos = [Image.open(p).convert("RGB") for p in shipped_photos()[:8]]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.size) // 2, min(photo.size)))
        x, y = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        cls = root / "train" / f"class{i % classes}"
        cls.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + side, y + side)).resize(size, Image.BICUBIC).save(cls / f"{i:03d}.jpg", quality=quality)
    return root
