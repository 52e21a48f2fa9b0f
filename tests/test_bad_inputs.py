"""Bad flags and bad data met the way a new user meets them (issue 11, items 6-8, 10 and 16): each one exits 2
with a message before any model is built, or, where only running can tell, ends with one line and exit 1."""
import os
import re

import pytest
from PIL import Image
from tiny import pretrain_argv

import main_finetune
import main_pretrain
import models_maskalign
import submitit_launch

READ_ONLY_DIR = "/proc" if os.geteuid() == 0 else None  # root writes anywhere permission bits allow


def no_model(monkeypatch):
    """Any model (student, teacher or fine-tuning ViT) built from here on fails the test."""
    fail = lambda *a, **k: pytest.fail("a model was built")  # noqa: E731
    monkeypatch.setattr(models_maskalign, "create_maskalign", fail)
    monkeypatch.setattr(main_pretrain, "build_model", fail)
    monkeypatch.setattr(main_finetune, "build_model", fail)


def exit_message(capsys, run, argv):
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    if READ_ONLY_DIR:
        return READ_ONLY_DIR
    path = tmp_path_factory.mktemp("read_only")
    path.chmod(0o555)
    return str(path)


@pytest.mark.parametrize("flags, message", [
    # item 8: trained wrongly and exited 0
    (["--lr", "-1"], "--lr must be > 0"),
    (["--clip_grad", "-1"], "--clip_grad is the largest gradient norm allowed and must be > 0"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0"),
    (["--mask_ratio", "0.9", "--input_size", "32"], "leaves the student int(4 x (1 - 0.9)) = 0 of 4 patches"),
    (["--input_size", "16"], "= 0 of 1 patches"),
    (["--start_epoch", "2", "--epochs", "2"], "--start_epoch 2 must be in [0, --epochs 2)"),
    # item 10: failed late with a traceback
    (["--blr", "-1"], "--blr must be > 0"),
    (["--drop_path", "1.5"], "--drop_path is a probability and must be in [0, 1)"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--print_freq", "0"], "--print_freq must be >= 1"),
    (["--input_size", "-16"], "--input_size -16 must be a positive multiple of the patch size 16"),
    (["--model_kwargs", "depth=abc"], "cannot be built: TypeError"),
    (["--model_kwargs", "depht=2"], "unexpected keyword argument 'depht'"),
    (["--model_kwargs", "embed_dim=64", "num_heads=5"], "cannot be built"),
    (["--model_kwargs", "img_size=64"], "--model_kwargs img_size=...: use --input_size"),
    (["--model_kwargs", "mask_ratio=0.5"], "--model_kwargs mask_ratio=...: use --mask_ratio"),
    # values, choices and devices
    (["--mask_ratio", "1.0"], "--mask_ratio"),
    (["--batch_size", "0"], "--batch_size"),
    (["--input_size", "50"], "multiple of the patch size"),
    (["--amp", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    (["--data_path", "/no/such/dir"], "does not exist"),
    (["--top_k", "0"], "--top_k"),
    (["--mask_type", "block"], "invalid choice"),
    (["--loss_weights", "best"], "topK"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--data_path", "/no/such/shard-{0..3}.tar"], "4 shard(s) do not exist"),
    (["--data_backend", "gpu", "--device", "cpu"], "needs --device cuda"),
    (["--data_backend", "nvjpeg"], "invalid choice"),
    (["--prefetch_factor", "0"], "--prefetch_factor"),
])
def test_pretrain_flags_exit_2_before_any_model(flags, message, data_dir, tmp_path, teacher_file, capsys,
                                                 monkeypatch):
    no_model(monkeypatch)
    argv = pretrain_argv(data_dir, tmp_path / "out", teacher_file, *flags)
    assert message in exit_message(capsys, main_pretrain.run, argv)
    assert not (tmp_path / "out").exists()


def test_bad_data_and_output_dirs_exit_2(data_dir, tmp_path, teacher_file, read_only_dir, capsys, monkeypatch):
    no_model(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    (tmp_path / "no_images" / "cls" / "notes.txt").write_text("x")
    cases = [
        ({"data": tmp_path / "empty"}, "has no class sub-directories"),
        ({"data": tmp_path / "no_images"}, "has no images with extensions"),
        ({"data": a_file}, f"--data_path {a_file} is a file, not a directory"),
        ({"data": tmp_path / "missing"}, "does not exist"),
        ({"data": ""}, "--data_path is empty"),
        ({"out": a_file}, f"--output_dir {a_file}: {a_file} is a file"),
        ({"out": a_file / "run1"}, f"{a_file} is a file"),
        ({"out": os.path.join(read_only_dir, "run1")}, f"cannot write in {read_only_dir}"),
    ]
    for case, message in cases:
        argv = pretrain_argv(case.get("data", data_dir), case.get("out", tmp_path / "out"), teacher_file)
        assert message in exit_message(capsys, main_pretrain.run, argv), case


def test_missing_teacher_weights_file_exits_2(data_dir, tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    argv = pretrain_argv(data_dir, tmp_path, str(tmp_path / "ViT-B-16.pt"))
    assert f"--teacher_weights {tmp_path / 'ViT-B-16.pt'}: no such file" in exit_message(capsys, main_pretrain.run,
                                                                                        argv)
    argv[argv.index("--teacher") + 1] = "open_clip:ViT-B-16"
    assert "not a pretrained tag of open_clip's ViT-B-16" in exit_message(capsys, main_pretrain.run, argv)


def test_all_bad_dataset_ends_with_one_line_and_exit_1(tmp_path, teacher_file, capsys):
    """60 unreadable files: the first sample gives up after 50 in a row, before the bad-share check; with a
    DataLoader worker the error crosses a process boundary (which used to wrap it in a traceback)."""
    for i in range(60):
        (tmp_path / "data" / "train" / "cls").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / "cls" / f"{i}.png").write_text("not an image")
    argv = pretrain_argv(tmp_path / "data", tmp_path / "out", teacher_file, "--num_workers", "1",
                         "--max_bad_fraction", "1.0")
    assert main_pretrain.run(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "ERROR 50 consecutive images failed to load" in errors[0]
    assert errors[0].endswith("is the data directory readable?")


# ------------------------------------------------------------------------------------------- fine-tuning
def classes_dir(root, splits=("train", "val"), classes=("a", "b", "c")):
    """An ImageFolder with the given splits and classes (2 grey images each)."""
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / split / cls / f"{i}.png")
    return root.resolve()


def finetune_argv(data, out, *extra):
    return ["--model", "vit_tiny_patch16_224", "--model_kwargs", "depth=1", "embed_dim=32", "num_heads=2",
            "--data_path", str(data), "--output_dir", str(out), "--input_size", "32", "--batch_size", "2",
            "--num_workers", "0", "--device", "cpu", "--epochs", "1", *extra]


def test_finetune_without_val_exits_2_instead_of_evaluating_on_the_training_images(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    data = classes_dir(tmp_path / "data", splits=("train",))
    err = exit_message(capsys, main_finetune.run, finetune_argv(data, tmp_path / "out"))
    assert f"--data_path {data} has no val/ folder" in err and "--val_file_list" in err
    err = exit_message(capsys, main_finetune.run, finetune_argv(data, tmp_path / "out", "--eval"))
    assert "has no val/ folder" in err
    flat = classes_dir(tmp_path / "flat", splits=(".",))  # an ImageFolder at the root: no split at all
    assert "has no val/ folder" in exit_message(capsys, main_finetune.run, finetune_argv(flat, tmp_path / "out"))
    (tmp_path / "val.txt").write_text("train/a/0.png 0\n")  # an explicit validation set is fine
    args = main_finetune.parse_args(finetune_argv(data, tmp_path / "out", "--val_file_list",
                                                  str(tmp_path / "val.txt")))
    assert args.nb_classes == 3


def test_nb_classes_is_inferred_checked_and_warned_about(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    data = classes_dir(tmp_path / "data")
    assert main_finetune.parse_args(finetune_argv(data, tmp_path / "out")).nb_classes == 3
    err = exit_message(capsys, main_finetune.run, finetune_argv(data, tmp_path / "out", "--nb_classes", "2"))
    assert f"--nb_classes 2 is smaller than the 3 classes in {data}" in err
    assert main_finetune.parse_args(finetune_argv(data, tmp_path / "out", "--nb_classes", "5")).nb_classes == 5
    assert "warning: --nb_classes 5 but" in capsys.readouterr().err
    os.rename(data / "val" / "c", data / "val" / "d")  # labels of val/ would not be those of train/
    err = exit_message(capsys, main_finetune.run, finetune_argv(data, tmp_path / "out"))
    assert "only in training: ['c'], only in val/: ['d']" in err


def test_finetune_file_and_model_kwargs_checked_before_any_model(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    data = classes_dir(tmp_path / "data")
    out = tmp_path / "out"
    missing = tmp_path / "checkpoint-199.pth"
    assert f"--finetune {missing} does not exist" in exit_message(
        capsys, main_finetune.run, finetune_argv(data, out, "--finetune", str(missing)))
    for kwargs, message in ((["depth=abc"], "cannot be built: TypeError"), (["num_classes=3"], "use --nb_classes"),
                            (["dpeth=1"], "unexpected keyword argument 'dpeth'")):
        argv = finetune_argv(data, out)
        argv[argv.index("--model_kwargs") + 1:argv.index("--data_path")] = kwargs
        assert message in exit_message(capsys, main_finetune.run, argv)


# ------------------------------------------------------------------------------------------------ --help
def help_entries(parser):
    """{option strings: its help text} from the --help output, one entry per option."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        match = re.match(r"^  (-\S.*?)(?:  +(\S.*))?$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2) or ""
        elif current and line.startswith("    "):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


PARSERS = {"main_pretrain.py": main_pretrain.get_args_parser, "main_finetune.py": main_finetune.get_args_parser,
           "submitit_launch.py": submitit_launch.get_args_parser}
# aliases that set another flag's value have no default of their own
NO_DEFAULT = {"-h, --help", "--fusion_type {linear,simple}"}


@pytest.mark.parametrize("script", list(PARSERS))
def test_help_shows_every_default_once(script):
    entries = help_entries(PARSERS[script]())
    assert len(entries) > 15
    for option, text in entries.items():
        statements = re.findall(r"\(default|default:|by default", text, re.IGNORECASE)
        assert len(statements) == (0 if option in NO_DEFAULT else 1), (option, text)


def test_help_states_the_defaults_the_issue_found_missing_or_wrong():
    pretrain = help_entries(main_pretrain.get_args_parser())
    finetune = help_entries(main_finetune.get_args_parser())
    assert pretrain["--epochs EPOCHS"] == "(default: 200)" and finetune["--epochs EPOCHS"] == "(default: 100)"
    assert pretrain["--weight_decay WEIGHT_DECAY"] == "(default: 0.05)"
    assert pretrain["--input_size INPUT_SIZE"] == "(default: 224)"
    assert "the number of classes in the data" in finetune["--nb_classes NB_CLASSES"]
    assert finetune["--cls_token"].endswith("(default: off)") and finetune["--global_pool"].endswith("(default: on)")
    assert pretrain["--align_cls, --no-align_cls"].endswith("(default: on)")
    assert "--mask_type {attentive,random}" in pretrain and "[attention = attentive]" in pretrain[
        "--mask_type {attentive,random}"]
    assert "linear = official, simple = layerwise" in pretrain["--fusion_type {linear,simple}"]


def test_fusion_type_takes_the_reference_names_only(capsys):
    assert main_pretrain.parse_args(["--fusion_type", "simple", "--device", "cpu"]).align == "layerwise"
    with pytest.raises(SystemExit):
        main_pretrain.parse_args(["--fusion_type", "sum", "--device", "cpu"])
    assert "choose linear = --align official, or simple = --align layerwise" in capsys.readouterr().err


def test_eval_needs_only_the_validation_set(tmp_path, monkeypatch):
    no_model(monkeypatch)
    data = classes_dir(tmp_path / "data", splits=("val",), classes=("a", "b"))
    args = main_finetune.parse_args(finetune_argv(data, tmp_path / "out", "--eval"))
    assert args.nb_classes == 2
    train, val = main_finetune.build_datasets(args)  # no train/: nothing is read in its place
    assert train is None and len(val) > 0
