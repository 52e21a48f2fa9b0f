"""WebDataset tar shards (util/shards.py, make_shards.py): conversion, reading, bad members, DDP sharding,
exact resume (issue #9)."""
import io
import json
import logging
import os
import tarfile

import pytest
from tiny import assert_same_weights, determined, make_photos, pretrain_argv, weights
from torch.utils.data import DataLoader
from torchvision import transforms

import main_finetune
import main_pretrain
import make_shards
from util import checkpoint
from util.data import TooManyBadSamplesError, build_dataset
from util.sampler import PerSampleSeeded, ResumableDistributedSampler
from util.shards import INDEX_SUFFIX, NO_LABEL, expand_braces, read_bytes, read_index, scan_shard

to_tensor = transforms.ToTensor()


@pytest.fixture
def photo_folder(tmp_path):
    return make_photos(tmp_path / "photos", n=10) / "train"


def _corrupt(path):
    """Cut a JPEG in half: the header parses, the decode fails."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _shard(folder, out, per_shard=4, *extra):
    assert make_shards.main(["--data_path", str(folder), "--output_dir", str(out),
                             "--samples_per_shard", str(per_shard), *extra]) == 0
    return sorted(str(out / n) for n in os.listdir(out) if n.endswith(".tar"))


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}/s-{8..10}.tar") == ["x/s-8.tar", "x/s-9.tar", "x/s-10.tar",
                                                    "y/s-8.tar", "y/s-9.tar", "y/s-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_hold_the_image_folder_byte_for_byte(photo_folder, tmp_path, capsys):
    paths = _shard(photo_folder, tmp_path / "shards")
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all(os.path.isfile(p + INDEX_SUFFIX) for p in paths)
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    assert pattern in capsys.readouterr().out
    folder = build_dataset(str(photo_folder), to_tensor)
    for spec in (pattern, str(tmp_path / "shards")):
        sharded = build_dataset(spec, to_tensor)
        assert len(sharded) == len(folder) == 10
        images = {open(p, "rb").read(): y for p, y in folder.samples}
        assert sorted(images.items()) == sorted((read_bytes(m), y) for m, y in sharded.samples)
    # the sidecar index and a scan of the tar agree; a stale sidecar is ignored
    assert read_index(paths[0]) == scan_shard(paths[0])
    index = json.load(open(paths[0] + INDEX_SUFFIX))
    index["tar_bytes"] += 1
    json.dump(index, open(paths[0] + INDEX_SUFFIX, "w"))
    assert read_index(paths[0]) == scan_shard(paths[0])


def test_split_folder_and_file_list_conversion(photo_folder, tmp_path):
    lines = [f"{os.path.relpath(p, photo_folder)} {7 + i % 2}" for i, p in enumerate(sorted(
        str(p) for p in photo_folder.rglob("*.jpg")))] + ["missing/file.jpg 3"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    _shard(photo_folder, tmp_path / "root" / "train", 100, "--file_list", str(tmp_path / "list.txt"), "--no_shuffle")
    ds = build_dataset(str(tmp_path / "root"), None, split="train")  # root/train/*.tar, like an ImageFolder
    assert len(ds) == 10 and sorted(set(ds.targets)) == [7, 8]  # the missing file was left out
    assert [m.name for m, _ in ds.samples][:2] == ["000000000.jpg", "000000001.jpg"]


def test_corrupt_jpeg_inside_a_shard_is_logged_counted_and_substituted(photo_folder, tmp_path, caplog):
    _corrupt(sorted(photo_folder.rglob("*.jpg"))[3])
    _shard(photo_folder, tmp_path / "shards", 4, "--no_shuffle")
    ds = build_dataset(str(tmp_path / "shards"), to_tensor, max_bad_fraction=0.5)
    bad = [i for i, (m, _) in enumerate(ds.samples) if m.name.startswith("000000003")]
    assert bad == [3]
    with caplog.at_level(logging.WARNING, logger="maskalign.data"):
        for i in range(len(ds)):
            image, _ = ds[i]
            assert image.shape == (3, 72, 96)
    assert (ds.num_bad, ds.num_attempted) == (1, len(ds) + 1)
    assert "shard-000000.tar:000000003.jpg" in caplog.text
    strict = build_dataset(str(tmp_path / "shards"), to_tensor, max_bad_fraction=0.05)
    with pytest.raises(TooManyBadSamplesError, match="max_bad_fraction"):
        for _ in range(2):  # the limit is checked once 10 loads were attempted: at the second encounter
            for i in range(len(strict)):
                strict[i]


def test_webdataset_tar_without_labels_and_a_truncated_tail(tmp_path, caplog):
    from PIL import Image
    path = tmp_path / "plain.tar"
    with tarfile.open(path, "w") as tar:
        for key, value in (("dir/a", 10), ("dir/b", 200)):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (value,) * 3).save(buffer, "PNG")
            for name, data in ((f"{key}.png", buffer.getvalue()), (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = build_dataset(str(path), to_tensor)
    assert ds.targets == [NO_LABEL, NO_LABEL] and ds[1][0].min() > 0.7
    second_image_offset = scan_shard(str(path))[1][1]
    path.write_bytes(path.read_bytes()[:second_image_offset + 10])  # cut inside the second image
    with caplog.at_level(logging.WARNING, logger="maskalign.data"):
        assert len(build_dataset(str(path), to_tensor)) == 1
    assert "truncated" in caplog.text


def test_ranks_and_workers_each_read_a_disjoint_share(photo_folder, tmp_path):
    """Two ranks x two workers: every sample exactly once (the tail that does not divide is dropped)."""
    _shard(photo_folder, tmp_path / "shards", 3)

    seen = []
    for rank in range(2):
        ds = build_dataset(str(tmp_path / "shards"), None, loader=lambda member: str(member))
        sampler = ResumableDistributedSampler(len(ds), rank=rank, world_size=2, seed=1, tag_epoch=True)
        loader = DataLoader(PerSampleSeeded(ds, 0), batch_size=2, sampler=sampler, num_workers=2,
                            multiprocessing_context="fork", collate_fn=lambda b: [name for name, _ in b])
        seen += [name for batch in loader for name in batch]
    assert len(seen) == len(set(seen)) == 10


def run_pretrain(data, out, teacher_file, *extra):
    return main_pretrain.run(pretrain_argv(data, out, teacher_file, *extra))


def test_resume_on_shards_with_fast_backend_and_persistent_workers_is_exact(tmp_path, teacher_file, monkeypatch):
    """Stopped mid-epoch and resumed, a run on shards (fast backend, 2 persistent workers) ends with the
    uninterrupted run's weights: same samples, same crops."""
    make_photos(tmp_path / "photos", n=24)
    _shard(tmp_path / "photos" / "train", tmp_path / "shards", 5)
    data = str(tmp_path / "shards" / "shard-{000000..000004}.tar")
    extra = ("--data_backend", "fast", "--num_workers", "2", "--save_interval_min", "0")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert run_pretrain(data, full, teacher_file, *extra) == 0

    original, calls = main_pretrain.pretrain_forward, {"n": 0}

    def crash_at_step_8(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # 6 steps per epoch: mid-epoch 1
            raise KeyboardInterrupt("simulated crash")
        return original(model, batch)

    monkeypatch.setattr(main_pretrain, "pretrain_forward", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(data, stopped, teacher_file, *extra)
    assert checkpoint.load(os.path.join(stopped, checkpoint.LATEST))["resume_step"] == 1
    monkeypatch.setattr(main_pretrain, "pretrain_forward", original)
    assert run_pretrain(data, stopped, teacher_file, *extra) == 0
    assert_same_weights(weights(full), weights(stopped))


@pytest.mark.parametrize("flags, message", [
    (["--data_backend", "fast"], "RandAugment"),
    (["--linprobe", "--data_path", "{a,b}.tar"], "names one split"),
])
def test_finetune_data_flags_exit_2(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.tar").touch()
    (tmp_path / "b.tar").touch()
    with pytest.raises(SystemExit) as exc:
        main_finetune.parse_args(flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_linprobe_on_train_and_val_shards_with_the_fast_backend(tmp_path):
    from test_finetune import finetune_argv, make_labelled
    labelled = make_labelled(tmp_path / "labelled")
    for split in ("train", "val"):
        _shard(labelled / split, tmp_path / "shards" / split, 10)
    argv = finetune_argv(tmp_path / "shards", tmp_path / "out", "--linprobe", "--data_backend", "fast",
                         "--epochs", "1", "--batch_size", "4")
    assert main_finetune.run(argv) == 0
    record = json.loads(open(tmp_path / "out" / "log.txt").readline())
    assert "test_acc1" in record and record["bad_images"] == 0


def test_two_ranks_on_shards_match_one_process(tmp_path, teacher_file):
    """torchrun with 2 gloo ranks x 2 workers on shards (fast backend) trains what one process with twice the
    batch trains: each rank read its share of the samples, with the same crops."""
    import subprocess
    import sys
    make_photos(tmp_path / "photos", n=24)
    _shard(tmp_path / "photos" / "train", tmp_path / "shards", 7)
    common = ("--epochs", "1", "--mask_ratio", "0.0", "--drop_path", "0", "--lr", "1e-3", "--data_backend", "fast",
              "--num_workers", "2")
    assert run_pretrain(tmp_path / "shards", tmp_path / "single", teacher_file, *common, "--batch_size", "8") == 0
    argv = pretrain_argv(tmp_path / "shards", tmp_path / "ddp", teacher_file, *common, "--batch_size", "4")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "main_pretrain.py", *argv], cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(determined(weights(tmp_path / "single")), determined(weights(tmp_path / "ddp")), exact=False)
