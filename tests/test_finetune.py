"""Fine-tuning, linear probing and checkpoint interop (issue #4)."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import export_timm
import main_finetune
import main_pretrain
from tiny import pretrain_argv
from util import checkpoint
from util.optim import LARS, param_groups_layer_decay
from util.pretrained import load_into, read_backbone

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
    assert best["acc1"] == max(l["test_acc1"] for l in lines)


def test_finetune_with_mixup_recipe_runs(labelled, pretrained_ckpt, tmp_path):
    out = tmp_path / "ft"
    assert main_finetune.run(finetune_argv(labelled, out, "--finetune", pretrained_ckpt, "--epochs", "1")) == 0
    assert np.isfinite(log_lines(out)[0]["train_loss"])


def test_linprobe_beats_chance_with_frozen_backbone(labelled, pretrained_ckpt, tmp_path):
    out = tmp_path / "lp"
    argv = finetune_argv(labelled, out, "--linprobe", "--finetune", pretrained_ckpt, "--epochs", "4",
                         "--warmup_epochs", "1", "--batch_size", "16", "--opt", "sgd", "--blr", "4")
    args = main_finetune.parse_args(argv)
    assert (args.opt, args.global_pool, args.weight_decay, args.mixup) == ("sgd", False, 0.0, 0.0)
    assert main_finetune.parse_args(["--linprobe", "--device", "cpu"]).opt == "lars"
    assert main_finetune.run(argv) == 0
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

    from models_maskalign import create_maskalign
    from maskalign.teachers import build_teacher

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


def test_eval_rebuilds_the_model_the_checkpoint_was_trained_as(labelled, pretrained_ckpt, tmp_path, capsys):
    """`--eval --resume CKPT` needs no model flags: model, model_kwargs, nb_classes, input_size, linprobe and
    global_pool come from CKPT's args (the command line still wins)."""
    out = tmp_path / "lp"
    assert main_finetune.run(finetune_argv(labelled, out, "--linprobe", "--finetune", pretrained_ckpt, "--epochs", "1",
                                           "--warmup_epochs", "0", "--batch_size", "16", "--opt", "sgd")) == 0
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
