"""Named settings (`--recipe NAME`) as data: the paper's, the reference release's, MAE's and the demo's.

A recipe is a set of flag defaults that `util.args.parse` applies before parsing, so explicit flags win. The
entry points' own defaults are read from here (`pretrain_b16_paper`, `finetune_b16_paper`), and the presets
are recipes: `--linprobe` brings `linprobe_mae`, `--demo` brings `pretrain_demo`. Per-GPU batch sizes assume
8 GPUs. docs/recipes.md compares them side by side and gives their sources.
"""
from dataclasses import asdict, dataclass
from typing import Any

from models_maskalign import DEFAULT_TEACHER, MaskAlignConfig


@dataclass(frozen=True)
class Recipe:
    task: str  # "pretrain", "finetune" or "linprobe" (main_finetune.py --linprobe)
    source: str  # "paper", "release", "mae" or "demo"
    summary: str  # one line for --help
    flags: dict[str, Any]  # argparse dest -> value


# Paper, section 4.1: AdamW (0.9, 0.95), blr 1.5e-4, weight decay 0.05, total batch 1024, cosine with 10%
# warm-up (20 of 200 epochs), drop path 0.1; CLIP-B/16 teacher, attentive masking 0.7, top-5 DA, linear
# adaptors, LN targets, [CLS] aligned (Table 6).
# MaskAlignConfig's defaults are the paper's MaskAlign choices.
_PRETRAIN_PAPER = dict(batch_size=128, accum_iter=1, epochs=200, warmup_epochs=20, blr=1.5e-4, min_lr=0.0,
                       weight_decay=0.05, drop_path=0.1, teacher=DEFAULT_TEACHER, **asdict(MaskAlignConfig()))
# Release README: the same, plus --min_lr 1e-5 and --fusion_type linear; ViT-L with --drop_path 0.2.
_PRETRAIN_RELEASE = dict(_PRETRAIN_PAPER, min_lr=1e-5, align="official")

# Paper: 100 epochs, 5 warm-up, blr 3e-4, layer decay 0.6, drop path 0.2, "the same batch size, optimizer and
# weight decay as in pre-training", MAE's augmentation (RandAugment, mixup 0.8, cutmix 1.0, smoothing 0.1,
# random erasing 0.25) and MAE's min_lr 1e-6.
_FINETUNE_PAPER = dict(linprobe=False, batch_size=128, accum_iter=1, epochs=100, warmup_epochs=5, blr=3e-4,
                       min_lr=1e-6, layer_decay=0.6, weight_decay=0.05, drop_path=0.2, opt="adamw",
                       global_pool=True, aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0,
                       smoothing=0.1)

# MAE's main_linprobe.py / FINETUNE.md: LARS, blr 0.1, weight decay 0, 90 epochs, 10 warm-up, [CLS] token,
# effective batch 16384 (MAE: 512 per GPU on 32 GPUs; here 512 x accum_iter 4 on 8 GPUs, so that the head's
# BatchNorm sees the same 512 images per step as in MAE).
MAE_LINPROBE = dict(batch_size=512, accum_iter=4, epochs=90, warmup_epochs=10, blr=0.1, min_lr=0.0,
                    weight_decay=0.0, opt="lars", global_pool=False, drop_path=0.0, mixup=0.0, cutmix=0.0,
                    smoothing=0.0)
LINPROBE_EFFECTIVE_BATCH = 16384

# The demo: scikit-learn's 8x8 digits upsampled to 32 px, 8-px patches (a 4x4 grid, each patch 2x2 digit pixels);
# student and teacher of the same size, as ViT-B/16 and CLIP-B/16 in the paper.
DEMO_IMAGE_SIZE = 32
DEMO_STUDENT_ARCH = dict(patch_size=8, depth=4, embed_dim=64, num_heads=2)
DEMO_TEACHER_TIMM = "vit_tiny_patch16_224"  # timm name; DEMO_TEACHER_ARCH overrides its size
DEMO_TEACHER_ARCH = dict(DEMO_STUDENT_ARCH)
DEMO_TEACHER = f"timm:{DEMO_TEACHER_TIMM}"
_PRETRAIN_DEMO = dict(
    model="maskalign_vit_tiny_patch16", model_kwargs=DEMO_STUDENT_ARCH, teacher=DEMO_TEACHER,
    teacher_kwargs={**DEMO_TEACHER_ARCH, "img_size": DEMO_IMAGE_SIZE}, input_size=DEMO_IMAGE_SIZE, batch_size=64,
    epochs=20, warmup_epochs=2, blr=4e-3, top_k=3, drop_path=0.0, num_workers=0, save_freq=1000, print_freq=1000,
    device="cpu")

RECIPES: dict[str, Recipe] = {
    "pretrain_b16_paper": Recipe(
        "pretrain", "paper", "ViT-B/16 student, CLIP-B/16 teacher, 200 epochs, eq. (1) alignment",
        dict(_PRETRAIN_PAPER, model="maskalign_vit_base_patch16")),
    "pretrain_b16_release": Recipe(
        "pretrain", "release", "as pretrain_b16_paper with min_lr 1e-5 and the release's --align official",
        dict(_PRETRAIN_RELEASE, model="maskalign_vit_base_patch16")),
    "pretrain_l16_paper": Recipe(
        "pretrain", "paper", "ViT-L/16 student, CLIP-B/16 teacher (Table 5), drop path 0.1, eq. (1) alignment",
        dict(_PRETRAIN_PAPER, model="maskalign_vit_large_patch16")),
    "pretrain_l16_release": Recipe(
        "pretrain", "release", "as pretrain_l16_paper with drop path 0.2, min_lr 1e-5 and --align official",
        dict(_PRETRAIN_RELEASE, model="maskalign_vit_large_patch16", drop_path=0.2)),
    "pretrain_demo": Recipe(
        "pretrain", "demo", "the demo's (= --demo): tiny ViT on 32-px digits, a label-trained teacher, CPU",
        _PRETRAIN_DEMO),
    "finetune_b16_paper": Recipe(
        "finetune", "paper", "ViT-B/16, 100 epochs, blr 3e-4, layer decay 0.6, drop path 0.2",
        dict(_FINETUNE_PAPER, model="vit_base_patch16_224")),
    "finetune_b16_release": Recipe(
        "finetune", "release", "as finetune_b16_paper with layer decay 0.55",
        dict(_FINETUNE_PAPER, model="vit_base_patch16_224", layer_decay=0.55)),
    "finetune_l16_paper": Recipe(
        "finetune", "paper", "ViT-L/16 with the paper's single fine-tuning setting (as finetune_b16_paper)",
        dict(_FINETUNE_PAPER, model="vit_large_patch16_224")),
    "finetune_l16_release": Recipe(
        "finetune", "release", "ViT-L/16, 50 epochs, blr 3e-4, layer decay 0.75, drop path 0.4",
        dict(_FINETUNE_PAPER, model="vit_large_patch16_224", epochs=50, layer_decay=0.75, drop_path=0.4)),
    "linprobe_mae": Recipe(
        "linprobe", "mae", "MAE's protocol (= --linprobe defaults): 512 x accum 4 x 8 GPUs = 16384, blr 0.1",
        dict(MAE_LINPROBE, linprobe=True)),
    "linprobe_release": Recipe(
        "linprobe", "release", "the release's: 2048 x 8 GPUs = 16384, blr 0.025 (lr 1.6)",
        dict(MAE_LINPROBE, linprobe=True, batch_size=2048, accum_iter=1, blr=0.025)),
}


def recipes_for(*tasks: str) -> dict[str, Recipe]:
    """The recipes an entry point offers: main_pretrain.py 'pretrain'; main_finetune.py 'finetune', 'linprobe'."""
    return {name: recipe for name, recipe in RECIPES.items() if recipe.task in tasks}
