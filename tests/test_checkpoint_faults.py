"""Checkpoint files under faults (issue #11): failed and killed writes, a full disk, damaged files."""
import errno
import json
import os
import shutil
from collections import namedtuple

import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny import pretrain_argv

import engine
import export_timm
import main_finetune
import main_pretrain
from util import checkpoint

TINY_VIT_FLAGS = ["--model", "vit_tiny_patch16_224", "--model_kwargs", "depth=2", "embed_dim=64", "num_heads=2"]


def pretrain(data, out, teacher_file, *extra):
    return main_pretrain.run(pretrain_argv(data, out, teacher_file, "--epochs", "1", *extra))


def temp_files(directory):
    return [n for n in os.listdir(directory) if ".tmp." in n]


def failing_save(error):
    """torch.save that dies part-way through the file, as a full disk makes it."""
    def save(obj, path_or_file):
        if hasattr(path_or_file, "write"):
            path_or_file.write(b"PK\x03\x04 half a checkpoint")
        else:
            with open(path_or_file, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
        raise error
    return save


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EIO = OSError(errno.EIO, "Input/output error")
TORCH_WRITER_ERROR = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
Usage = namedtuple("Usage", "total used free")


# ------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("error", [ENOSPC, TORCH_WRITER_ERROR], ids=["errno", "torch-writer"])
def test_full_disk_is_one_line_with_the_space_needed(tmp_path, monkeypatch, error):
    path = str(tmp_path / "checkpoint-latest.pth")
    checkpoint.save_atomic({"epoch": 0}, path)
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(error))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda d: Usage(10 * 2**20, 9 * 2**20, 2**20))  # 1 MB
    with pytest.raises(checkpoint.CheckpointError) as exc:
        checkpoint.save_atomic({"model": {"w": torch.zeros(3 * 2**20, dtype=torch.uint8)}}, path)
    message = str(exc.value)
    assert message.startswith(f"no space left on device in {tmp_path}: the checkpoint needs 3 MB (1 MB free)")
    assert "\n" not in message and "inline_container" not in message
    assert checkpoint.load(path) == {"epoch": 0}  # the earlier checkpoint is intact
    assert temp_files(tmp_path) == []


def test_a_failed_write_that_is_not_about_space_keeps_its_error_and_removes_its_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-latest.pth")
    checkpoint.save_atomic({"epoch": 0}, path)
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(TORCH_WRITER_ERROR))  # plenty of space: not the disk
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoint.save_atomic({"epoch": 1}, path)
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"epoch": 1}, path)
    assert temp_files(tmp_path) == [] and checkpoint.load(path) == {"epoch": 0}


def test_full_disk_during_a_run_exits_1_with_one_line_and_the_last_checkpoint_intact(data_dir, tmp_path,
                                                                                      teacher_file, monkeypatch,
                                                                                      capsys):
    assert pretrain(data_dir, tmp_path, teacher_file) == 0
    done = checkpoint.load(str(tmp_path / checkpoint.LATEST))
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(ENOSPC))
    assert pretrain(data_dir, tmp_path, teacher_file, "--epochs", "2", "--save_interval_min", "0") == 1
    err = capsys.readouterr().err
    assert f"no space left on device in {tmp_path}: the checkpoint needs" in err and "Traceback" not in err
    monkeypatch.undo()
    kept = checkpoint.load(str(tmp_path / checkpoint.LATEST))
    assert kept["resume_epoch"] == done["resume_epoch"] == 1
    assert all(torch.equal(kept["model"][k], v) for k, v in done["model"].items())
    assert temp_files(tmp_path) == []


def test_stale_temp_files_are_removed_when_a_run_starts(data_dir, tmp_path, teacher_file):
    tmp_path.joinpath("checkpoint-latest.pth.tmp.4242").write_bytes(b"PK" + bytes(10000))  # killed mid-write
    tmp_path.joinpath("notes.tmp.txt").write_text("not ours")
    assert pretrain(data_dir, tmp_path, teacher_file) == 0
    assert temp_files(tmp_path) == ["notes.tmp.txt"]


def kill_when(monkeypatch, module, name, hit):
    """Make module.name raise a simulated kill on the call for which hit(*args) is true."""
    original = getattr(module, name)

    def patched(*args, **kwargs):
        if hit(*args):
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


@pytest.mark.parametrize("killed_in", ["numbered checkpoint", "log.txt line"])
def test_a_kill_after_latest_marks_the_epoch_done_loses_neither_its_checkpoint_nor_its_log_line(
        data_dir, tmp_path, teacher_file, monkeypatch, killed_in):
    """checkpoint-latest.pth is written first at an epoch's end; the rerun (which starts at the next epoch)
    writes the numbered checkpoint and the log.txt line of that epoch if a kill came in between."""
    if killed_in == "numbered checkpoint":
        kill_when(monkeypatch, checkpoint, "save_atomic", lambda obj, path: path.endswith("checkpoint-0.pth"))
    else:
        kill_when(monkeypatch, engine, "_log_epoch", lambda args, env, writer, record: record["epoch"] == 0)
    with pytest.raises(KeyboardInterrupt):
        pretrain(data_dir, tmp_path, teacher_file, "--epochs", "2", "--save_freq", "1")
    assert checkpoint.load(str(tmp_path / checkpoint.LATEST))["resume_epoch"] == 1  # epoch 0 is marked done
    monkeypatch.undo()
    assert pretrain(data_dir, tmp_path, teacher_file, "--epochs", "2", "--save_freq", "1") == 0
    assert checkpoint.load(str(tmp_path / "checkpoint-0.pth"))["epoch"] == 0
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "log.txt")] == [0, 1]


# ------------------------------------------------------------------------------------------- reading
def damaged_files(directory):
    """A real checkpoint cut short or overwritten in the ways files get damaged, and a cut safetensors file."""
    good = directory / "good.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}, "epoch": 0, "args": {}}, good)
    data = good.read_bytes()
    files = {"empty": b"", "cut-at-start": data[:10], "cut-in-the-middle": data[:len(data) // 2],
             "cut-near-the-end": data[:-10], "zeros": bytes(5000), "git-lfs-pointer": b"version https://git-lfs"
             b".github.com/spec/v1\noid sha256:0123\nsize 123\n", "html-error-page": b"<html>404 Not Found</html>"}
    paths = {}
    for name, content in files.items():
        paths[name] = directory / f"{name}.pth"
        paths[name].write_bytes(content)
    save_file({"w": torch.randn(8, 8)}, str(directory / "full.safetensors"))
    paths["cut-safetensors"] = directory / "cut.safetensors"
    paths["cut-safetensors"].write_bytes((directory / "full.safetensors").read_bytes()[:-10])
    return paths


def test_damaged_files_are_one_line_naming_the_file_never_code(tmp_path):
    for name, path in damaged_files(tmp_path).items():
        with pytest.raises(checkpoint.CheckpointError) as exc:
            checkpoint.load(str(path))
        message = str(exc.value)
        assert message.startswith(f"{path} is truncated or corrupt ("), (name, message)
        assert "\n" not in message and "execute code" not in message, (name, message)


def one_line_error(capsys, path):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if f"{path} is truncated or corrupt" in line]
    assert len(lines) == 1, err[-2000:]
    assert "execute code" not in err


@pytest.fixture
def damaged(tmp_path):
    paths = damaged_files(tmp_path)
    return paths["cut-in-the-middle"], paths["cut-safetensors"]


def test_pretrain_with_a_damaged_latest_or_resume_exits_1(data_dir, tmp_path, teacher_file, damaged, capsys):
    cut_pth, _ = damaged
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(cut_pth, out / checkpoint.LATEST)
    assert pretrain(data_dir, out, teacher_file) == 1
    one_line_error(capsys, out / checkpoint.LATEST)
    assert pretrain(data_dir, tmp_path / "other", teacher_file, "--resume", str(cut_pth)) == 1
    one_line_error(capsys, cut_pth)


def test_finetune_with_a_damaged_file_exits_1(data_dir, tmp_path, damaged, capsys):
    cut_pth, cut_safetensors = damaged
    labelled = tmp_path / "labelled"
    shutil.copytree(os.path.join(data_dir, "train"), labelled / "train")
    shutil.copytree(os.path.join(data_dir, "train"), labelled / "val")
    common = [*TINY_VIT_FLAGS, "--data_path", str(labelled), "--nb_classes", "2", "--input_size", "32",
              "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--epochs", "1"]
    for i, flags in enumerate([["--finetune", str(cut_pth)], ["--finetune", str(cut_safetensors)],
                               ["--resume", str(cut_pth)], ["--eval", "--resume", str(cut_pth)]]):
        assert main_finetune.run([*common, "--output_dir", str(tmp_path / f"ft{i}"), *flags]) == 1, flags
        one_line_error(capsys, flags[-1])


def test_export_of_a_damaged_file_exits_1(tmp_path, damaged, capsys):
    for path in damaged:
        assert export_timm.main([str(path), str(tmp_path / "out")]) == 1
        one_line_error(capsys, path)


@pytest.mark.parametrize("failing", ["pth", "safetensors", "config.json", "not-about-space", "read-only"])
def test_export_that_cannot_write_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, capsys, failing):
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=2, embed_dim=64,
                                           num_heads=2).state_dict()}, tmp_path / "c.pth")
    out = tmp_path / "out"
    if failing == "read-only":  # a real refusal: an existing directory nobody may write into
        out = "/proc" if os.geteuid() == 0 else out  # root writes anywhere permission bits allow
        if out != "/proc":
            out.mkdir()
            out.chmod(0o555)
    elif failing == "not-about-space":
        monkeypatch.setattr(checkpoint.torch, "save", failing_save(EIO))
    else:
        real_open = open
        suffix = {"pth": ".pth", "safetensors": ".safetensors", "config.json": "config.json"}[failing]

        def full_disk_open(path, mode="r", *args, **kwargs):
            if "w" in mode and str(path).split(checkpoint.TEMP_SUFFIX)[0].endswith(suffix):
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return real_open(path, mode, *args, **kwargs)
        monkeypatch.setattr("builtins.open", full_disk_open)
    assert export_timm.main([str(tmp_path / "c.pth"), str(out), *TINY_VIT_FLAGS]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "export failed" in line]) == 1, err
    if failing == "not-about-space":
        assert f"export failed: cannot write the export to {out}: Input/output error; choose another output_dir" in err
    elif failing == "read-only":
        assert f"export failed: cannot write the export to {out}: " in err and "choose another output_dir" in err
    else:
        assert f"export failed: no space left on device in {out}: the export needs" in err
        assert "none of vit_tiny_patch16_224_" in err and "Free space or choose another output_dir" in err
    assert not [name for name in os.listdir(out) if "vit_tiny" in name or name.startswith("config.json")]


def test_export_removes_the_temp_files_of_a_killed_export(tmp_path):
    torch.save({"model": timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=2, embed_dim=64,
                                           num_heads=2).state_dict()}, tmp_path / "c.pth")
    out = tmp_path / "out"
    out.mkdir()
    stale = [f"vit_tiny_patch16_224_mae.pth{checkpoint.TEMP_SUFFIX}123", f"config.json{checkpoint.TEMP_SUFFIX}9"]
    for name in stale + ["notes.txt"]:
        (out / name).write_bytes(b"half")
    assert export_timm.main([str(tmp_path / "c.pth"), str(out), *TINY_VIT_FLAGS]) == 0
    left = sorted(os.listdir(out))
    assert not set(stale) & set(left) and "notes.txt" in left and "config.json" in left, left


def test_resume_from_weights_alone_is_a_clear_error(tmp_path):
    save_file({"w": torch.randn(8, 8)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="holds no training state"):
        checkpoint.restore_training_state(str(tmp_path / "w.safetensors"), torch.nn.Linear(8, 8), None, None)
