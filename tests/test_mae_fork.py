"""Our files dropped into an MAE fork without overwriting anything (README, "Into an existing MAE fork").

The fork is tests/mae_standin.py's tree: MAE's file names and the functions its scripts import. The code under
test runs in a subprocess whose only source tree is the fork, as it would for a user."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from mae_standin import FILES as MAE_FILES
from mae_standin import write_mae_tree
from tiny import TINY_TEACHER, make_images, pretrain_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a model needs, as the README says to copy it.
MODEL_SET = ["models_maskalign.py", "maskalign"]
README_COPY_LINE = "cp -rn models_maskalign.py maskalign/ /path/to/mae/"


def tree_digest(root):
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def tracked_top_level():
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted({path.split("/")[0] for path in listed.split()})


def copy_without_overwriting(names, fork):
    subprocess.run(["cp", "-rn", *names, str(fork)], cwd=REPO, check=True)


def run_in_fork(fork, code):
    """Python in the fork alone (our repo is not on the path), as a user's MAE checkout runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=fork, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MAE_IMPORTS = """
import importlib, json, os, sys
fork = os.getcwd()
names = ["util.pos_embed", "util.misc", "util.datasets", "util.lr_sched", "util.lr_decay", "util.lars", "util.crop",
         "models_mae", "models_vit", "engine_pretrain", "engine_finetune", "main_pretrain", "main_finetune",
         "main_linprobe"]
modules = {n: importlib.import_module(n) for n in names}
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from util.misc import NativeScalerWithGradNormCount
from util.datasets import build_dataset, build_transform
import models_mae
models_mae.mae_vit_base_patch16()
assert all(os.path.dirname(m.__file__) in (fork, os.path.join(fork, "util")) for m in modules.values())
"""

MAE_PRETRAIN_STEP = """
import argparse, copy, math, torch, timm.optim
import engine_pretrain, util.misc as misc
import models_maskalign
model = models_maskalign.__dict__["maskalign_vit_tiny"](
    norm_pix_loss=False, teacher="timm:vit_tiny_patch16_224", teacher_weights=TEACHER, teacher_kwargs=TINY_TEACHER,
    img_size=32, depth=2, embed_dim=64, num_heads=2, top_k=3)
args = argparse.Namespace(accum_iter=1, lr=1e-3, min_lr=0.0, warmup_epochs=1, epochs=2, mask_ratio=0.75,
                          output_dir=fork)
param_groups = timm.optim.param_groups_weight_decay(model, 0.05, model.no_weight_decay())
optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
torch.manual_seed(0)
mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
loader = [((torch.rand(4, 3, 32, 32) - mean) / std, torch.zeros(4, dtype=torch.long)) for _ in range(3)]
before = copy.deepcopy(model.state_dict())
teacher_before = copy.deepcopy(model.teacher.state_dict())
stats = engine_pretrain.train_one_epoch(model, loader, optimizer, torch.device("cpu"), 0,
                                        misc.NativeScalerWithGradNormCount(), args=args)
after = model.state_dict()
misc.save_model(args, 0, model, model, optimizer, misc.NativeScalerWithGradNormCount())
result = dict(loss=stats["loss"], changed=sorted(k for k in after if not torch.equal(before[k], after[k])),
              teacher_same=all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items()),
              module=os.path.relpath(models_maskalign.__file__, fork))
"""

MAE_FINETUNE_LOAD = """
import torch, models_vit, main_finetune
loaded = {}
for global_pool, img_size in ((True, 48), (False, 32)):
    vit = models_vit.VisionTransformer(global_pool=global_pool, img_size=img_size, patch_size=16, embed_dim=64,
                                       depth=2, num_heads=2, num_classes=5)
    msg = main_finetune.load_finetune_checkpoint(vit, CKPT, global_pool)
    source = torch.load(CKPT, map_location="cpu")["model"]
    loaded[str(global_pool)] = dict(
        unexpected=sorted(msg.unexpected_keys),
        blocks_equal=all(torch.equal(v, source[k]) for k, v in vit.state_dict().items() if k.startswith("blocks.")),
        logits=list(vit(torch.randn(2, 3, img_size, img_size)).shape))
result = loaded
"""


def fork_script(*parts, **constants):
    header = "".join(f"{name} = {value!r}\n" for name, value in constants.items())
    return header + "".join(parts) + "\nprint(json.dumps(result))\n"


@pytest.fixture
def mae_fork(tmp_path):
    fork = tmp_path / "mae"
    write_mae_tree(fork)
    return fork


def test_readme_gives_the_copy_line():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert README_COPY_LINE in readme
    assert re.search(r"import models_maskalign", readme)


def test_model_files_do_not_collide_with_mae():
    mae_names = set(MAE_FILES)
    ours = {os.path.relpath(os.path.join(folder, name), REPO)
            for entry in MODEL_SET for folder, _, files in os.walk(os.path.join(REPO, entry))
            for name in files if name.endswith(".py")} | {"models_maskalign.py"}
    assert ours and not ours & mae_names
    assert not os.path.exists(os.path.join(REPO, "util", "__init__.py")), "would shadow MAE's util/ namespace"


@pytest.mark.parametrize("what", ["model set", "whole repo"])
def test_copied_without_overwriting_keeps_mae_working(mae_fork, what):
    mae_before = tree_digest(mae_fork)
    copy_without_overwriting(MODEL_SET if what == "model set" else tracked_top_level(), mae_fork)
    after = tree_digest(mae_fork)
    assert {k: after[k] for k in mae_before} == mae_before, "an MAE file was overwritten"
    assert "models_maskalign.py" in after and "maskalign/teachers.py" in after
    ours = "import models_maskalign, maskalign.teachers\n"
    if what == "whole repo":  # our training plumbing lives beside MAE's util/ modules in the same namespace
        ours += "import engine, export_timm, util.checkpoint, util.args, util.data\n"
    run_in_fork(mae_fork, fork_script(MAE_IMPORTS, ours, "result = {}"))


def test_mae_pretrain_loop_trains_our_model(mae_fork, teacher_file):
    copy_without_overwriting(MODEL_SET, mae_fork)
    result = run_in_fork(mae_fork, fork_script(MAE_IMPORTS, MAE_PRETRAIN_STEP, TEACHER=teacher_file,
                                               TINY_TEACHER=TINY_TEACHER))
    assert result["module"] == "models_maskalign.py"  # the copy in the fork, not our repo
    assert 0 < result["loss"] < float("inf")
    assert result["teacher_same"]
    trained = set(result["changed"])
    assert "dynamic_align.weight" in trained and "blocks.0.attn.qkv.weight" in trained
    assert "pos_embed" not in trained  # fixed sin-cos


def test_mae_finetune_loads_our_pretraining_checkpoint(mae_fork, teacher_file, tmp_path):
    data, out = make_images(tmp_path / "data"), tmp_path / "pretrain"
    import main_pretrain
    assert main_pretrain.run(pretrain_argv(data, out, teacher_file, "--epochs", "1")) == 0
    copy_without_overwriting(MODEL_SET, mae_fork)
    result = run_in_fork(mae_fork, fork_script("import json\n", MAE_FINETUNE_LOAD,
                                               CKPT=str(out / "checkpoint-0.pth")))
    for global_pool, loaded in result.items():
        assert loaded["blocks_equal"] and loaded["logits"] == [2, 5]
        # only our alignment module is left over (and the final norm, which MAE's global pooling drops)
        leftovers = {k for k in loaded["unexpected"] if not k.startswith("dynamic_align.")}
        assert leftovers == ({"norm.weight", "norm.bias"} if global_pool == "True" else set())
        assert any(k.startswith("dynamic_align.") for k in loaded["unexpected"])
