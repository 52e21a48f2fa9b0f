"""Fine-tuning, linear probing and checkpoint interop (issue #4)."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tiny import assert_same_weights, pretrain_argv
from torchvision import transforms

import export_timm
import main_finetune
import main_pretrain
import submitit_launch
from benchmarks import bench_pretrain
from util import checkpoint
from util.data import TFRandomResizedCrop, build_finetune_transform, eval_resize_size
from util.metrics import setup_logging
from util.optim import LARS, param_groups_layer_decay
from util.pretrained import load_into, read_backbone, resize_pos_embed

TINY_VIT = dict(depth=2, embed_dim=64, num_heads=2)
TINY_VIT_FLAGS = ["--model", "vit_tiny_patch16_224", "--model_kwargs", "depth=2", "embed_dim=64", "num_heads=2"]


def tiny_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{"img_size": 32, **TINY_VIT, **kwargs})


def make_labelled(root, n_train=24, n_val=8, seed=0):
    """Easy task: class 0 images are dark and reddish, class 1 bright and bluish."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in (0, 1):
            d = root / split / f"class{cls}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array([150, 40, 40]) if cls == 0 else np.array([60, 120, 230])
                img = np.clip(base + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_labelled(tmp_path_factory.mktemp("labelled"))


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory, teacher_file, labelled):
    out = tmp_path_factory.mktemp("pretrain")
    assert main_pretrain.run(pretrain_argv(labelled, out, teacher_file, "--epochs", "1")) == 0
    return str(out / "checkpoint-0.pth")


def finetune_argv(data, out, *extra):
    return [*TINY_VIT_FLAGS, "--data_path", str(data), "--output_dir", str(out), "--nb_classes", "2",
            "--input_size", "32", "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
            "--print_freq", "100", *extra]


def log_lines(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


# --------------------------------------------------------------------------------------------- export
def test_export_loads_strictly_into_timm_with_equal_outputs(pretrained_ckpt, tmp_path):
    assert export_timm.main([pretrained_ckpt, str(tmp_path), *TINY_VIT_FLAGS]) == 0
    config = json.load(open(tmp_path / "config.json"))
    assert config["architecture"] == "vit_tiny_patch16_224" and config["pretrain_args"]["top_k"] == 3
    # reference: the student weights of the pre-training checkpoint, loaded by hand
    ckpt = checkpoint.load(pretrained_ckpt)["model"]
    reference = tiny_vit(num_classes=0).eval()
    reference.load_state_dict({k: v for k, v in ckpt.items() if not k.startswith("dynamic_align")})
    x = torch.randn(2, 3, 32, 32)
    for suffix in (".safetensors", ".pth"):
        path = tmp_path / f"vit_tiny_patch16_224_maskalign{suffix}"
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32, **TINY_VIT,
                                pretrained_cfg_overlay=dict(file=str(path), num_classes=0)).eval()
        for k, v in ckpt.items():
            if not k.startswith("dynamic_align"):
                assert torch.equal(vit.state_dict()[k], v), k
        with torch.no_grad():
            torch.testing.assert_close(vit(x), reference(x))


def test_export_names_the_timm_model_from_pretrain_args(tmp_path):
    from models_maskalign import STUDENT_ARCHS
    state = tiny_vit(num_classes=0).state_dict()
    torch.save({"model": state, "args": {"model": "maskalign_vit_tiny_patch16", "model_kwargs": {}}},
               tmp_path / "c.pth")
    backbone = read_backbone(str(tmp_path / "c.pth"))
    from util.pretrained import timm_name_for
    assert timm_name_for(backbone) == STUDENT_ARCHS["tiny"][1]


# ------------------------------------------------------------------------------------ checkpoint layouts
def student_keys():
    return tiny_vit(num_classes=0).state_dict()


def test_reference_maskalign_checkpoint_loads(tmp_path):
    sd = dict(student_keys())
    sd.update({"clip_model.vision_model.embeddings.class_embedding": torch.zeros(48),
               "clip_model.vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 48),
               "distill_heads.0.weight": torch.zeros(48, 64), "distill_heads.0.bias": torch.zeros(48),
               "distill_weights": torch.eye(2) + 0.01})
    torch.save({"model": sd, "epoch": 199}, tmp_path / "ref.pth")
    backbone = read_backbone(str(tmp_path / "ref.pth"))
    assert backbone.source == "maskalign-reference"
    assert {"distill_weights", "distill_heads.0.weight", "clip_model.vision_model.embeddings.class_embedding"} <= \
        set(backbone.dropped)
    report = load_into(tiny_vit(num_classes=2, global_pool="avg"), backbone)
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "norm.weight" in report.dropped  # global pooling replaces the final norm, as in MAE


def test_mae_checkpoint_loads(tmp_path):
    sd = dict(student_keys())
    sd.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
               "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.weight": torch.zeros(768, 32)})
    torch.save({"model": sd, "epoch": 799, "args": {"model": "mae_vit_base_patch16"}}, tmp_path / "mae.pth")
    backbone = read_backbone(str(tmp_path / "mae.pth"))
    assert backbone.source == "mae"
    assert set(backbone.dropped) == {"mask_token", "decoder_embed.weight", "decoder_blocks.0.norm1.weight",
                                     "decoder_pred.weight"}
    model = tiny_vit(num_classes=2, global_pool="token")
    report = load_into(model, backbone)
    assert report.missing == ["head.bias", "head.weight"]
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_plain_timm_state_dicts_load(tmp_path, fmt):
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in tiny_vit(num_classes=5).state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    torch.save(sd, path) if fmt == "pth" else save_file(sd, str(path))
    backbone = read_backbone(str(path))
    assert backbone.source == "timm"
    report = load_into(tiny_vit(num_classes=2), backbone)
    assert report.missing == ["head.bias", "head.weight"] and "head.weight" in report.dropped


def test_pos_embed_interpolated_to_finetune_size(tmp_path):
    torch.save({"model": student_keys()}, tmp_path / "c.pth")
    model = tiny_vit(num_classes=2, img_size=64)
    report = load_into(model, read_backbone(str(tmp_path / "c.pth")))
    assert report.resized_pos_embed == (5, 17) and model.pos_embed.shape[1] == 17


def test_mismatched_architecture_fails_clearly(tmp_path):
    torch.save({"model": student_keys()}, tmp_path / "c.pth")
    with pytest.raises(checkpoint.CheckpointError, match="width 64 and depth 2.*vit_base_patch16_224"):
        load_into(tiny_vit(depth=3), read_backbone(str(tmp_path / "c.pth")), expected_name="vit_base_patch16_224")
    std = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32).state_dict()
    torch.save(std, tmp_path / "small.pth")
    with pytest.raises(checkpoint.CheckpointError, match="looks like vit_small_patch16_224.*--model vit_small"):
        load_into(tiny_vit(), read_backbone(str(tmp_path / "small.pth")), expected_name="vit_tiny_patch16_224")


def test_mismatched_architecture_cli_exit_code(labelled, tmp_path):
    torch.save({"model": student_keys()}, tmp_path / "c.pth")
    argv = finetune_argv(labelled, tmp_path / "out", "--finetune", str(tmp_path / "c.pth"), "--epochs", "1")
    argv[argv.index("depth=2")] = "depth=3"
    assert main_finetune.run(argv) == 1


def test_not_a_vit_checkpoint(tmp_path):
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, tmp_path / "c.pth")
    with pytest.raises(checkpoint.CheckpointError, match="does not look like a ViT"):
        read_backbone(str(tmp_path / "c.pth"))


# ------------------------------------------------------------------------------------ optimiser groups
def test_layer_decay_scales_per_block():
    model = tiny_vit(num_classes=2)
    groups = param_groups_layer_decay(model, 0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["patch_embed.proj.weight"])] == 0.5 ** 3
    assert scale_of[id(named["cls_token"])] == 0.5 ** 3 and wd_of[id(named["cls_token"])] == 0.0
    assert scale_of[id(named["blocks.0.attn.qkv.weight"])] == 0.5 ** 2
    assert scale_of[id(named["blocks.1.mlp.fc1.weight"])] == 0.5
    assert scale_of[id(named["head.weight"])] == 1.0 and wd_of[id(named["head.weight"])] == 0.05
    assert wd_of[id(named["blocks.1.norm1.weight"])] == 0.0
    assert len(scale_of) == len(named)


# ------------------------------------------------------------------------------------ training runs
def test_finetune_beats_chance_with_ema(labelled, pretrained_ckpt, tmp_path):
    out = tmp_path / "ft"
    argv = finetune_argv(labelled, out, "--finetune", pretrained_ckpt, "--epochs", "4", "--warmup_epochs", "1",
                         "--blr", "2e-2", "--layer_decay", "0.75", "--mixup", "0", "--cutmix", "0", "--aa", "",
                         "--reprob", "0", "--model_ema", "--model_ema_decay", "0.9")
    assert main_finetune.run(argv) == 0
    lines = log_lines(out)
    assert lines[-1]["test_acc1"] > 75.0, lines
    assert "test_ema_acc1" in lines[-1] and lines[-1]["max_accuracy"] >= lines[-1]["test_acc1"]
    latest = checkpoint.load(str(out / checkpoint.LATEST))
    assert any(not torch.equal(latest["model"][k], latest["model_ema"][k]) for k in latest["model"])
    assert os.path.exists(out / "checkpoint-best.pth")
    # --eval reproduces the stored accuracy of the best checkpoint
    best = checkpoint.load(str(out / "checkpoint-best.pth"))
    assert main_finetune.run(finetune_argv(labelled, tmp_path / "eval", "--eval", "--resume",
                                           str(out / "checkpoint-best.pth"))) == 0
    assert best["acc1"] == max(max(rec["test_acc1"], rec["test_ema_acc1"]) for rec in lines)
    assert best["model_ema"].keys() == best["model"].keys()


def test_finetune_with_mixup_recipe_runs(labelled, pretrained_ckpt, tmp_path):
    out = tmp_path / "ft"
    assert main_finetune.run(finetune_argv(labelled, out, "--finetune", pretrained_ckpt, "--epochs", "1")) == 0
    assert np.isfinite(log_lines(out)[0]["train_loss"])


def test_linprobe_beats_chance_with_frozen_backbone(labelled, pretrained_ckpt, tmp_path, capsys):
    out = tmp_path / "lp"
    argv = finetune_argv(labelled, out, "--linprobe", "--finetune", pretrained_ckpt, "--epochs", "4",
                         "--warmup_epochs", "1", "--batch_size", "16", "--accum_iter", "1", "--opt", "sgd",
                         "--blr", "4")
    args = main_finetune.parse_args(argv)
    assert (args.opt, args.global_pool, args.weight_decay, args.mixup) == ("sgd", False, 0.0, 0.0)
    assert main_finetune.parse_args(["--linprobe", "--device", "cpu"]).opt == "lars"
    assert main_finetune.run(argv) == 0
    assert "linear probing at an effective batch of 16 " in capsys.readouterr().err  # not the protocol's 16384
    assert log_lines(out)[-1]["test_acc1"] > 75.0, log_lines(out)
    trained = checkpoint.load(str(out / checkpoint.LATEST))["model"]
    pretrained = checkpoint.load(pretrained_ckpt)["model"]
    assert torch.equal(trained["blocks.1.mlp.fc2.weight"], pretrained["blocks.1.mlp.fc2.weight"])
    assert "head.0.running_mean" in trained and "head.0.weight" not in trained  # BN without affine


def test_finetune_flag_validation(capsys):
    with pytest.raises(SystemExit) as exc:
        main_finetune.parse_args(["--model", "no_such_vit", "--device", "cpu"])
    assert exc.value.code == 2 and "not a timm model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main_finetune.parse_args(["--batch_size", "7", "--device", "cpu"])
    assert exc.value.code == 2


def test_finetune_paper_defaults():
    args = main_finetune.parse_args(["--device", "cpu"])
    assert (args.epochs, args.warmup_epochs, args.blr, args.layer_decay, args.drop_path, args.global_pool) == \
        (100, 5, 3e-4, 0.6, 0.2, True)
    assert args.min_lr == 1e-6  # MAE's fine-tuning default
    assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == \
        (0.8, 1.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1")


def test_lars_scales_matrix_updates_by_trust_ratio():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = LARS(layer.parameters(), lr=0.5, trust_coefficient=0.001)
    layer(torch.randn(16, 8)).pow(2).sum().backward()
    g_bias = layer.bias.grad.clone()
    opt.step()
    step_w = (layer.weight.detach() - w0).norm()
    torch.testing.assert_close(step_w, 0.5 * 0.001 * w0.norm())  # |update| = lr * eta * |w|, whatever |g| is
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.5 * g_bias)  # 1-D params: plain SGD


def test_reference_checkpoint_exports_to_timm(tmp_path):
    sd = dict(student_keys())
    sd.update({"dino_model.embeddings.cls_token": torch.zeros(1, 1, 48), "distill_weights": torch.eye(2) + 0.01})
    torch.save({"model": sd}, tmp_path / "ref.pth")
    assert export_timm.main([str(tmp_path / "ref.pth"), str(tmp_path / "out"), *TINY_VIT_FLAGS]) == 0
    exported = torch.load(tmp_path / "out" / "vit_tiny_patch16_224_maskalign.pth", weights_only=True)
    assert exported.keys() == student_keys().keys()
    assert json.load(open(tmp_path / "out" / "config.json"))["source_format"] == "maskalign-reference"


def test_export_of_wrong_architecture_fails_cleanly(tmp_path, capsys):
    torch.save({"model": student_keys()}, tmp_path / "c.pth")
    assert export_timm.main([str(tmp_path / "c.pth"), str(tmp_path / "out")]) == 1  # width 64: no known ViT
    assert "pass --model" in capsys.readouterr().err


def test_checkpoint_with_namespace_args_loads(labelled, tmp_path):
    """MAE's and the reference code's save_model store args as an argparse.Namespace."""
    import argparse
    sd = dict(student_keys())
    sd["distill_weights"] = torch.eye(2) + 0.01
    torch.save({"model": sd, "epoch": 199, "args": argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4)},
               tmp_path / "ref.pth")
    backbone = read_backbone(str(tmp_path / "ref.pth"))
    assert backbone.pretrain_args == {"model": "mae_vit_base_patch16", "blr": 1.5e-4}
    assert main_finetune.run(finetune_argv(labelled, tmp_path / "ft", "--finetune", str(tmp_path / "ref.pth"),
                                           "--epochs", "1")) == 0


def test_reference_pretraining_checkpoint_resumes_in_the_official_form(tmp_path):
    """A released checkpoint (student + T distill heads + T x S distill_weights + teacher weights) continues
    pre-training in `--align official` with the same predictions."""
    import argparse

    from maskalign.teacher_weights import build_teacher
    from models_maskalign import create_maskalign

    def official_model():
        torch.manual_seed(0)
        teacher = build_teacher("timm:vit_tiny_patch16_224", 32, 16, weights="none", depth=3, embed_dim=48,
                                num_heads=3, img_size=32)
        return create_maskalign("tiny", teacher=teacher, img_size=32, **TINY_VIT, top_k=2, align="official",
                                adaptor="mlp")

    source = official_model()
    with torch.no_grad():
        source.dynamic_align.weight.normal_()
    reference = {k: v for k, v in source.state_dict().items() if not k.startswith("dynamic_align")}
    reference["distill_weights"] = source.dynamic_align.weight.detach().t().clone()  # [teacher, student]
    for j in range(3):  # one head per teacher block; blocks 1 and 2 are the top-2 targets
        adaptor = source.dynamic_align.adaptors[j - 1] if j else torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 48))
        reference.update({f"distill_heads.{j}.{k}": v for k, v in adaptor.state_dict().items()})
    reference["clip_model.vision_model.post_layernorm.weight"] = torch.ones(48)
    torch.save({"model": reference, "epoch": 3, "args": argparse.Namespace(fusion_type="linear")},
               tmp_path / "released.pth")

    model = official_model()
    opt = torch.optim.AdamW(model.parameters())
    epoch, step, _ = checkpoint.restore_training_state(str(tmp_path / "released.pth"), model, opt, None)
    assert (epoch, step) == (4, 0)
    imgs, ids_keep = torch.randn(2, 3, 32, 32), torch.tensor([[0, 3], [1, 2]])
    torch.testing.assert_close(model.eval()(imgs, ids_keep=ids_keep)[1], source.eval()(imgs, ids_keep=ids_keep)[1])
    with pytest.raises(checkpoint.CheckpointError, match="--align official"):
        torch.manual_seed(0)
        dynamic = create_maskalign("tiny", teacher=model.teacher, img_size=32, **TINY_VIT, top_k=2)
        checkpoint.restore_training_state(str(tmp_path / "released.pth"), dynamic, None, None)


# --------------------------------------------------------------------- MAE's protocol, item by item (#13)
def test_linprobe_crop_is_maes_single_draw_crop():
    """MAE's TF-style crop on a 500x375 image: one draw, sides clamped. torchvision's retrying crop is
    measured alongside to show what the difference is (mean area 0.435, 0.6% full-side crops)."""
    width, height, n = 500, 375, 20000
    torch.manual_seed(0)
    crop = TFRandomResizedCrop(224)
    boxes = [crop.crop_box(width, height) for _ in range(n)]
    assert all(0 <= top <= height - h and 0 <= left <= width - w for top, left, h, w in boxes)
    area = np.mean([h * w for _, _, h, w in boxes]) / (width * height)
    full_side = np.mean([h == height or w == width for _, _, h, w in boxes])
    assert abs(area - 0.518) < 0.01 and abs(full_side - 0.256) < 0.015, (area, full_side)

    image = Image.new("RGB", (width, height))
    torchvision_boxes = [transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                         for _ in range(n)]
    tv_area = np.mean([h * w for _, _, h, w in torchvision_boxes]) / (width * height)
    tv_full_side = np.mean([h == height or w == width for _, _, h, w in torchvision_boxes])
    assert abs(tv_area - 0.435) < 0.01 and tv_full_side < 0.02, (tv_area, tv_full_side)


def test_linprobe_uses_maes_crop_unless_asked_otherwise(labelled):
    argv = finetune_argv(labelled, "unused", "--linprobe")
    train = main_finetune.build_datasets(main_finetune.parse_args(argv))[0].dataset
    assert isinstance(train.transform.transforms[0], TFRandomResizedCrop)
    assert train[0][0].shape == (3, 32, 32)
    train = main_finetune.build_datasets(main_finetune.parse_args([*argv, "--linprobe_crop", "torchvision"]))[0].dataset
    assert type(train.transform.transforms[0]) is transforms.RandomResizedCrop


@pytest.mark.parametrize("input_size, resize", [(224, 256), (192, 219), (256, 256), (384, 384), (448, 448)])
def test_eval_resize_follows_maes_crop_pct(input_size, resize):
    """crop_pct 0.875 up to 224 px, 1.0 above: a 384 model sees the whole shorter side."""
    assert eval_resize_size(input_size) == resize
    t = build_finetune_transform(False, input_size)
    assert t.transforms[0].size == resize and t.transforms[1].size == (input_size, input_size)
    assert t(Image.new("RGB", (500, 375))).shape == (3, input_size, input_size)


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """1-D bicubic resampling (align_corners=False, edge samples repeated) written out by hand."""
    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            m[o, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return m


@pytest.mark.parametrize("old, new", [(3, 5), (6, 4)])
def test_pos_embed_resize_is_maes_plain_bicubic(old, new):
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + old * old, 8)
    resized = resize_pos_embed(pos_embed, (new, new))
    assert torch.equal(resized[:, :1], pos_embed[:, :1])  # [CLS] kept apart
    grid = pos_embed[0, 1:].reshape(old, old, 8).double().numpy()
    m = bicubic_matrix(old, new)
    by_hand = np.einsum("ij,jkc,lk->ilc", m, grid, m).reshape(new * new, 8)
    np.testing.assert_allclose(resized[0, 1:].numpy(), by_hand, rtol=1e-5, atol=1e-5)


def test_pos_embed_antialias_is_timms_and_differs_as_measured():
    from timm.layers import resample_abs_pos_embed

    from maskalign.pos_embed import sincos_2d_pos_embed
    pos_embed = sincos_2d_pos_embed(768, 14).reshape(1, 197, 768).float()
    for new, difference in ((24, 0.009), (7, 0.032)):
        timm_resized = resample_abs_pos_embed(pos_embed, [new, new], num_prefix_tokens=1)
        assert torch.equal(resize_pos_embed(pos_embed, (new, new), antialias=True), timm_resized)
        mae_resized = resize_pos_embed(pos_embed, (new, new))
        relative = ((mae_resized - timm_resized).norm() / timm_resized.norm()).item()
        assert abs(relative - difference) < 0.001, (new, relative)


def test_finetune_at_another_resolution_interpolates_like_mae(tmp_path):
    state = student_keys()
    torch.save({"model": state}, tmp_path / "c.pth")
    source = state["pos_embed"]
    for antialias in (False, True):
        model = tiny_vit(num_classes=2, img_size=64)
        load_into(model, read_backbone(str(tmp_path / "c.pth")), antialias_pos_embed=antialias)
        assert torch.equal(model.pos_embed.detach(), resize_pos_embed(source, (4, 4), antialias=antialias))
    assert not torch.equal(resize_pos_embed(source, (4, 4)), resize_pos_embed(source, (4, 4), antialias=True))
    args = main_finetune.parse_args(["--device", "cpu"])
    assert args.pos_embed_antialias is False and \
        main_finetune.parse_args(["--device", "cpu", "--pos_embed_antialias"]).pos_embed_antialias


@pytest.mark.parametrize("opt", ["adamw", "sgd", "lars"])
def test_finetune_optimizers_keep_layer_decay_and_no_weight_decay_groups(opt):
    args = main_finetune.parse_args(["--device", "cpu", "--opt", opt, "--layer_decay", "0.5"])
    model = tiny_vit(num_classes=2)
    optimizer = main_finetune.build_optimizer(args, model)
    expected = param_groups_layer_decay(model, 0.05, layer_decay=0.5)
    assert [(g["lr_scale"], g["weight_decay"], g["params"]) for g in optimizer.param_groups] == \
        [(g["lr_scale"], g["weight_decay"], g["params"]) for g in expected]
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [0.125, 0.25, 0.5, 1.0]  # embeddings .. head


def test_unsupported_flag_combinations_exit_2(capsys):
    cases = [(["--linprobe", "--opt", "adamw"], "--opt lars or --opt sgd"),
             (["--linprob"], "unrecognized arguments: --linprob"),  # no abbreviation of --linprobe
             (["--eval_ema"], "--eval --resume")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main_finetune.parse_args(["--device", "cpu", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


ABBREVIATED_FLAGS = {  # entry point -> a call that parses an abbreviated flag
    "main_pretrain": lambda: main_pretrain.parse_args(["--dem"]),
    "main_finetune": lambda: main_finetune.parse_args(["--linprob"]),
    "export_timm": lambda: export_timm.main(["c.pth", "out", "--mod", "x"]),
    "submitit_launch": lambda: submitit_launch.get_args_parser().parse_args(["--dry"]),
    "benchmarks/bench_pretrain": lambda: bench_pretrain.main(["--batch", "4"]),
}


@pytest.mark.parametrize("entry_point", ABBREVIATED_FLAGS)
def test_no_entry_point_accepts_abbreviated_flags(entry_point, capsys):
    with pytest.raises(SystemExit) as exc:
        ABBREVIATED_FLAGS[entry_point]()
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_cudnn_benchmark_is_on_for_cuda_runs(monkeypatch):
    from engine import configure_backends
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_backends(torch.device("cuda", 0))  # sets a flag only: no GPU needed
    assert torch.backends.cudnn.benchmark is True


def test_linprobe_defaults_reach_16384_on_8_gpus():
    args = main_finetune.parse_args(["--linprobe", "--device", "cpu"])
    assert (args.batch_size * args.accum_iter * 8, args.blr, args.opt, args.global_pool) == (16384, 0.1, "lars", False)
    assert args.blr * 16384 / 256 == 6.4  # MAE's lr


def scripted_evaluate(monkeypatch, top1):
    """main_finetune.evaluate returning the given top-1 values in call order; records the weights it saw."""
    seen = []

    def fake(model, loader, device, args, distributed=False):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"acc1": top1[len(seen) - 1], "acc5": 100.0, "loss": 1.0}
    monkeypatch.setattr(main_finetune, "evaluate", fake)
    return seen


def test_best_checkpoint_takes_the_ema_when_it_scores_higher(labelled, tmp_path, monkeypatch):
    """Rule: each epoch the better of model and EMA (the model on a tie) competes; checkpoint-best.pth's
    `model` holds the winning weights, `best_source` names them, `model_ema` holds the EMA."""
    out = tmp_path / "ft"
    # epoch 0: model 50 / EMA 40 -> best model; epoch 1: 45 / 70 -> best EMA; epoch 2: 60 / 65 -> no change
    seen = scripted_evaluate(monkeypatch, [50.0, 40.0, 45.0, 70.0, 60.0, 65.0])
    argv = finetune_argv(labelled, out, "--epochs", "3", "--warmup_epochs", "1", "--mixup", "0", "--cutmix", "0",
                         "--model_ema", "--model_ema_decay", "0.5")
    assert main_finetune.run(argv) == 0
    best = checkpoint.load(str(out / "checkpoint-best.pth"))
    assert (best["best_source"], best["acc1"], best["epoch"], best["test_acc1"], best["test_ema_acc1"]) == \
        ("model_ema", 70.0, 1, 45.0, 70.0)
    assert any(not torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # epoch 1: the EMA is not the model
    assert_same_weights(best["model"], seen[3])
    assert_same_weights(best["model_ema"], seen[3])
    assert [line["max_accuracy"] for line in log_lines(out)] == [50.0, 70.0, 70.0]
    latest = checkpoint.load(str(out / checkpoint.LATEST))
    assert_same_weights(latest["model"], seen[4])
    assert_same_weights(latest["model_ema"], seen[5])

    # --eval evaluates a checkpoint's `model`, --eval_ema its `model_ema`
    for flags, key in ((["--eval"], "model"), (["--eval", "--eval_ema"], "model_ema")):
        evaluated = scripted_evaluate(monkeypatch, [99.0])
        argv = finetune_argv(labelled, tmp_path / "eval", *flags, "--resume", str(out / checkpoint.LATEST))
        assert main_finetune.run(argv) == 0
        assert_same_weights(evaluated[0], latest[key])


def test_eval_ema_of_a_checkpoint_without_ema_fails_with_a_message(labelled, tmp_path, capsys):
    torch.save({"model": tiny_vit(num_classes=2).state_dict()}, tmp_path / "plain.pth")
    argv = finetune_argv(labelled, tmp_path / "e", "--eval", "--eval_ema", "--resume", str(tmp_path / "plain.pth"))
    assert main_finetune.run(argv) == 1
    assert "plain.pth has no `model_ema` weights" in capsys.readouterr().err


def test_eval_rebuilds_the_model_the_checkpoint_was_trained_as(labelled, pretrained_ckpt, tmp_path, capsys):
    """`--eval --resume CKPT` needs no model flags: model, model_kwargs, nb_classes, input_size, linprobe and
    global_pool come from CKPT's args (the command line still wins)."""
    out = tmp_path / "lp"
    assert main_finetune.run(finetune_argv(labelled, out, "--linprobe", "--finetune", pretrained_ckpt, "--epochs", "1",
                                           "--warmup_epochs", "0", "--batch_size", "16", "--accum_iter", "1",
                                           "--opt", "sgd")) == 0
    latest = str(out / checkpoint.LATEST)
    argv = ["--eval", "--resume", latest, "--data_path", str(labelled), "--output_dir", str(tmp_path / "eval"),
            "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]
    args = main_finetune.parse_args(argv)
    assert (args.model, args.model_kwargs, args.nb_classes, args.input_size, args.linprobe, args.global_pool) == \
        ("vit_tiny_patch16_224", TINY_VIT, 2, 32, True, False)
    assert main_finetune.parse_args([*argv, "--nb_classes", "5"]).nb_classes == 5
    capsys.readouterr()
    assert main_finetune.run(argv) == 0
    assert f"top-1 {log_lines(out)[-1]['test_acc1']:.2f}%" in capsys.readouterr().err
    # a model the checkpoint does not fit: one line, exit 1
    assert main_finetune.run([*argv, "--model_kwargs", "depth=3", "embed_dim=64", "num_heads=2"]) == 1
    err = capsys.readouterr().err
    assert "does not match this model" in err and "Traceback" not in err


def save_classifier(path, nb_classes):
    """A fine-tuned tiny ViT checkpoint for `nb_classes` classes, with the args --eval adopts."""
    torch.save({"model": tiny_vit(num_classes=nb_classes, global_pool="avg").state_dict(),
                "args": {"model": "vit_tiny_patch16_224", "model_kwargs": TINY_VIT, "nb_classes": nb_classes,
                         "input_size": 32}}, path)
    return str(path)


def eval_argv(labelled, ckpt, out):
    return ["--eval", "--resume", ckpt, "--data_path", str(labelled), "--output_dir", str(out), "--batch_size", "8",
            "--num_workers", "0", "--device", "cpu"]


@pytest.mark.parametrize("nb_classes", [5, 1])
def test_eval_of_a_checkpoint_for_other_classes_exits_2_before_evaluating(labelled, tmp_path, monkeypatch, capsys,
                                                                          nb_classes):
    ckpt = save_classifier(tmp_path / "c.pth", nb_classes)
    setup_logging(True)  # parsing logs the adopted flags: to this test's stderr, not an earlier test's
    monkeypatch.setattr(main_finetune, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(SystemExit) as exc:
        main_finetune.run(eval_argv(labelled, ckpt, tmp_path / "eval"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"--resume {ckpt} classifies {nb_classes} classes but the validation set {labelled / 'val'} has 2" in err
    # the hint is one the parser accepts: --nb_classes may exceed the data's classes, never fall below them
    assert ("give --nb_classes 5" in err) == (nb_classes == 5)
    # the command line wins: --nb_classes says which head to build (the checkpoint must then fit it)
    assert main_finetune.parse_args([*eval_argv(labelled, ckpt, tmp_path / "eval"),
                                     "--nb_classes", "5"]).nb_classes == 5


def test_eval_reads_its_checkpoint_once(labelled, tmp_path, monkeypatch):
    ckpt = save_classifier(tmp_path / "c.pth", 2)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    kept = {}
    real_main = main_finetune.main

    def main(args, resumed=None, **kwargs):
        kept["before"] = sorted(k for k, v in resumed.items() if v is not None)
        real_main(args, resumed, **kwargs)
        kept["after"] = dict(resumed)
    monkeypatch.setattr(main_finetune, "main", main)
    assert main_finetune.run(eval_argv(labelled, ckpt, tmp_path / "eval")) == 0
    assert reads.count(ckpt) == 1
    # only the weights it evaluates are held from parsing on, and nothing once they are loaded
    assert kept == {"before": ["model"], "after": {}}


def test_export_of_an_mae_checkpoint_is_named_for_mae_readable_by_others_and_lists_what_it_dropped(tmp_path,
                                                                                                  capsys):
    sd = dict(student_keys())
    mae_only = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
                "decoder_pred.weight": torch.zeros(768, 32)}
    torch.save({"model": {**sd, **mae_only}, "args": {"model": "mae_vit_base_patch16"}}, tmp_path / "mae.pth")
    umask = os.umask(0o022)
    try:
        assert export_timm.main([str(tmp_path / "mae.pth"), str(tmp_path / "out"), *TINY_VIT_FLAGS]) == 0
    finally:
        os.umask(umask)
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["config.json", "vit_tiny_patch16_224_mae.pth", "vit_tiny_patch16_224_mae.safetensors"]
    assert all(os.stat(tmp_path / "out" / f).st_mode & 0o777 == 0o644 for f in files)
    assert json.load(open(tmp_path / "out" / "config.json"))["dropped_keys"] == sorted(mae_only)
    assert "dropped 3 keys that are not part of the backbone: decoder_embed" in capsys.readouterr().err
