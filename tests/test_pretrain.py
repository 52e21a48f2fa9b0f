"""main_pretrain.py and engine.py on CPU with a tiny model (issue #3)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import assert_same_weights, determined, make_images, pretrain_argv, weights

import main_pretrain
from util import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_lines(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt"))]


def run(data, out, teacher_file, *extra):
    return main_pretrain.run(pretrain_argv(data, out, teacher_file, *extra))


def fault_at(monkeypatch, call, before=None, after=None):
    """Patch the pre-training forward so that its `call`-th micro-step first runs `before()` and/or has its
    loss replaced by `after(model, loss)`; returns the original forward."""
    original = main_pretrain.pretrain_forward
    calls = {"n": 0}

    def patched(model, batch):
        calls["n"] += 1
        hit = calls["n"] == call
        if hit and before:
            before()
        loss, metrics = original(model, batch)
        return (after(model, loss) if hit and after else loss), metrics

    monkeypatch.setattr(main_pretrain, "pretrain_forward", patched)
    return original


def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def crash():
    raise KeyboardInterrupt("simulated crash")


def test_tiny_run_writes_checkpoints_and_logs(data_dir, tmp_path, teacher_file):
    assert run(data_dir, tmp_path, teacher_file, "--save_freq", "1") == 0
    assert {"checkpoint-latest.pth", "checkpoint-0.pth", "checkpoint-1.pth", "log.txt"} <= set(os.listdir(tmp_path))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))
    ckpt = checkpoint.load(os.path.join(tmp_path, "checkpoint-1.pth"))
    assert {"model", "optimizer", "scaler", "epoch", "args"} <= ckpt.keys() and ckpt["epoch"] == 1
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["mask_type"] == "attentive"
    assert "dynamic_align.weight" in ckpt["model"]
    assert not any("teacher" in k for k in ckpt["model"])
    lines = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert [rec["epoch"] for rec in lines] == [0, 1]
    assert all(np.isfinite(rec["train_loss"]) and "train_loss_level2" in rec for rec in lines)


def test_resume_mid_epoch_reproduces_uninterrupted_run(data_dir, tmp_path, teacher_file, monkeypatch):
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    extra = ("--save_interval_min", "0", "--drop_path", "0.1")
    assert run(data_dir, full, teacher_file, *extra) == 0

    original = fault_at(monkeypatch, 8, before=crash)  # 6 steps per epoch: step 8 is mid-epoch 1
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, interrupted, teacher_file, *extra)
    state = checkpoint.load(os.path.join(interrupted, checkpoint.LATEST))
    assert (state["resume_epoch"], state["resume_step"]) == (1, 1)
    monkeypatch.setattr(main_pretrain, "pretrain_forward", original)
    assert run(data_dir, interrupted, teacher_file, *extra) == 0  # auto-resumes from checkpoint-latest
    assert_same_weights(weights(full), weights(interrupted))
    # the resumed epoch's log.txt averages cover the whole epoch, not only the steps after the resume
    full_log, resumed_log = log_lines(full), log_lines(interrupted)
    assert [line["epoch"] for line in resumed_log] == [0, 1]
    for a, b in zip(full_log, resumed_log):
        assert {k: v for k, v in a.items() if k.startswith("train_")} == \
            pytest.approx({k: v for k, v in b.items() if k.startswith("train_")}, rel=1e-12)


def test_progress_after_a_mid_epoch_resume_shows_numbers_not_nan(data_dir, tmp_path, teacher_file, monkeypatch,
                                                                 capsys):
    original = fault_at(monkeypatch, 8, before=crash)  # 6 steps per epoch: step 8 is mid-epoch 1
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, tmp_path, teacher_file, "--save_interval_min", "0")
    monkeypatch.setattr(main_pretrain, "pretrain_forward", original)
    capsys.readouterr()
    # the meters come back from the checkpoint, and a step's values are read at the next step (at once only
    # before a checkpoint is written, so not with the default --save_interval_min)
    assert run(data_dir, tmp_path, teacher_file, "--print_freq", "1") == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if "Epoch: [1] [" in line]
    assert len(progress) == 5 and "loss: " in progress[0], progress
    assert all("nan" not in line for line in progress), progress


def test_accumulation_matches_larger_batch(data_dir, tmp_path, teacher_file):
    common = ("--epochs", "1", "--mask_ratio", "0.0", "--drop_path", "0", "--lr", "1e-3")
    assert run(data_dir, tmp_path / "big", teacher_file, *common, "--batch_size", "8") == 0
    assert run(data_dir, tmp_path / "accum", teacher_file, *common, "--batch_size", "4", "--accum_iter", "2") == 0
    assert_same_weights(determined(weights(tmp_path / "big")), determined(weights(tmp_path / "accum")), exact=False)


def test_the_attention_key_bias_gets_no_gradient():
    """Why `determined` leaves it out of the comparisons between batch layouts: in float64 its gradient is
    zero to 1e-10 of the query and value biases' gradients (softmax ignores what it adds)."""
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, embed_dim=64,
                            num_heads=2).double()
    vit(torch.randn(4, 3, 32, 32, dtype=torch.float64)).square().mean().backward()
    for block in vit.blocks:
        query, key, value = block.attn.qkv.bias.grad.chunk(3)
        assert key.abs().max() < 1e-10 * min(query.abs().max(), value.abs().max())


def test_two_process_gloo_matches_single_process(data_dir, tmp_path, teacher_file):
    common = ("--epochs", "1", "--mask_ratio", "0.0", "--drop_path", "0", "--lr", "1e-3")
    assert run(data_dir, tmp_path / "single", teacher_file, *common, "--batch_size", "8") == 0
    argv = pretrain_argv(data_dir, tmp_path / "ddp", teacher_file, *common, "--batch_size", "4")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "main_pretrain.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(determined(weights(tmp_path / "single")), determined(weights(tmp_path / "ddp")), exact=False)


def test_corrupt_files_are_skipped_and_counted(tmp_path, teacher_file):
    data = make_images(tmp_path / "data")
    (data / "train" / "class0" / "empty.png").write_bytes(b"")
    (data / "train" / "class1" / "text.jpg").write_text("not an image")
    assert run(data, tmp_path / "out", teacher_file, "--epochs", "1", "--max_bad_fraction", "0.5") == 0
    record = json.loads(open(tmp_path / "out" / "log.txt").readline())
    assert record["bad_images"] >= 1


def test_nan_loss_stops_with_checkpoint_intact(data_dir, tmp_path, teacher_file, monkeypatch):
    fault_at(monkeypatch, 4, after=lambda model, loss: loss * float("nan"))
    assert run(data_dir, tmp_path, teacher_file, "--save_interval_min", "0") == 1
    state = checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))
    assert (state["resume_epoch"], state["resume_step"]) == (0, 3)  # written after the last good step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_sigterm_writes_latest_and_stops(data_dir, tmp_path, teacher_file, monkeypatch):
    fault_at(monkeypatch, 2, before=sigterm)
    assert run(data_dir, tmp_path, teacher_file) == 143
    state = checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))
    assert (state["resume_epoch"], state["resume_step"]) == (0, 2)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "epoch": 0, "payload": _Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        checkpoint.load(str(path))


def test_atomic_save_leaves_no_temp_files(tmp_path):
    checkpoint.save_atomic({"x": torch.ones(2)}, str(tmp_path / "a.pth"))
    assert os.listdir(tmp_path) == ["a.pth"]


def test_reference_fusion_type_linear_is_the_reference_computation():
    assert main_pretrain.parse_args(["--fusion_type", "linear", "--device", "cpu"]).align == "official"
    assert main_pretrain.parse_args(["--device", "cpu"]).align == "dynamic"


def test_reference_flag_aliases():
    args = main_pretrain.parse_args(["--mask_type", "attention", "--fusion_type", "simple", "--target_norm",
                                     "whiten", "--loss_type", "smoothl1", "--loss_weights", "top3", "--head_type",
                                     "mlp", "--teacher_model", "facebook/dino-vitb16", "--device", "cpu"])
    assert (args.mask_type, args.align, args.target_norm, args.loss_type, args.top_k, args.adaptor, args.teacher) \
        == ("attentive", "layerwise", "ln", "smooth_l1", 3, "mlp", "facebook/dino-vitb16")


def test_paper_defaults():
    args = main_pretrain.parse_args(["--device", "cpu"])
    assert (args.blr, args.weight_decay, args.epochs, args.warmup_epochs, args.drop_path, args.mask_ratio) == \
        (1.5e-4, 0.05, 200, 20.0, 0.1, 0.7)
    assert args.amp == "none" and args.batch_size * 8 == 1024


def test_unknown_teacher_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main_pretrain.run(["--teacher", "clip-please", "--device", "cpu"])
    assert exc.value.code == 2 and "unknown teacher" in capsys.readouterr().err


def test_teacher_that_cannot_be_built_exits_with_message(data_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:  # a hub tag while offline (HF_HUB_OFFLINE=1 in tests)
        run(data_dir, tmp_path, "openai", "--teacher", "open_clip:ViT-B-16", "--teacher_kwargs")
    assert "--teacher_weights" in str(exc.value.code)


def test_torch_distributed_launch_local_rank_flag_is_accepted():
    assert main_pretrain.parse_args(["--local-rank=0", "--device", "cpu"]).local_rank == 0


def test_demo_preset_prepares_data_and_trains_the_teacher(tmp_path, monkeypatch):
    import functools

    import demo_inputs
    from util.recipes import DEMO_TEACHER
    monkeypatch.setattr(demo_inputs, "prepare_demo_data", functools.partial(demo_inputs.prepare_demo_data, per_class=3))
    monkeypatch.setattr(demo_inputs, "TEACHER_EPOCHS", 1)
    argv = ["--demo", "--output_dir", str(tmp_path), "--epochs", "1", "--batch_size", "8", "--vis_freq", "0"]
    args = main_pretrain.parse_args(argv)
    assert (args.model, args.input_size, args.device, args.teacher) == (
        "maskalign_vit_tiny_patch16", 32, "cpu", DEMO_TEACHER)
    assert main_pretrain.run(argv) == 0
    assert sorted(os.listdir(tmp_path / "demo_data" / "train")) == [str(d) for d in range(10)]  # the digits
    assert len(os.listdir(tmp_path / "demo_data" / "val" / "7")) == 3
    # the teacher was trained with labels (main_finetune's loop: log.txt with a held-out accuracy) and saved
    teacher_log = [json.loads(line) for line in open(tmp_path / "demo_teacher" / "log.txt")]
    assert "test_acc1" in teacher_log[-1]
    assert {"demo_teacher.pth", "checkpoint-latest.pth", "log.txt"} <= set(os.listdir(tmp_path))


def test_stop_at_the_last_step_of_an_epoch_keeps_its_end_of_epoch_work(data_dir, tmp_path, teacher_file,
                                                                        monkeypatch):
    original = fault_at(monkeypatch, 6, before=sigterm)  # 6 steps per epoch: epoch 0's last step
    assert run(data_dir, tmp_path, teacher_file) == 143
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "log.txt")] == [0]  # epoch 0 was logged
    state = checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))
    assert (state["resume_epoch"], state["resume_step"]) == (1, 0)
    monkeypatch.setattr(main_pretrain, "pretrain_forward", original)
    assert run(data_dir, tmp_path, teacher_file) == 0
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "log.txt")] == [0, 1]


def test_non_finite_gradient_with_finite_loss_stops_before_the_update(data_dir, tmp_path, teacher_file,
                                                                      monkeypatch):
    def nan_gradient(model, loss):
        model.cls_token.register_hook(lambda g: g * float("nan"))
        return loss + 0.0 * model.cls_token.sum()

    fault_at(monkeypatch, 4, after=nan_gradient)
    assert run(data_dir, tmp_path, teacher_file, "--save_interval_min", "0") == 1
    state = checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))
    assert state["resume_step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_stop_signal_to_the_whole_process_group_spares_the_data_workers(data_dir, tmp_path, teacher_file):
    """`scancel` and SLURM preemption signal every process of the job, data-loader workers included: they must
    outlive the main process's checkpoint at the next step (torch's own worker handler dies on SIGTERM)."""
    argv = pretrain_argv(data_dir, tmp_path, teacher_file, "--epochs", "1000", "--num_workers", "2",
                         "--print_freq", "1")
    proc = subprocess.Popen([sys.executable, "main_pretrain.py", *argv], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if "Epoch: [1]" in line:  # a step of epoch 1 is done: that epoch's workers are running
                break
        assert proc.poll() is None, "the run ended before epoch 1"
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.stdout.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 143, output[-3000:]
    assert "killed by signal" not in output
    state = checkpoint.load(os.path.join(tmp_path, checkpoint.LATEST))
    assert state["resume_epoch"] >= 1 and state["resume_step"] >= 1
