"""`make demo` end to end at a tiny budget: data, trained teacher, three pre-trainings, linear probe + k-NN,
pictures, report; a second run continues or says it is done."""
import json
import os

import pytest

import demo

TINY = ["--per_class", "2", "--epochs", "1", "--teacher_epochs", "1", "--probe_epochs", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert demo.main(["--output_dir", str(out), *TINY]) == 0
    return out


def test_report_has_every_method_measured(finished):
    report = json.loads((finished / "report.json").read_text())
    assert set(report["methods"]) == {"maskalign", "feature_distillation", "scratch"}
    for name, method in report["methods"].items():
        for key in ("linear_probe_top1", "knn_top1"):
            assert 0.0 <= method[key] <= 100.0, (name, key)
        assert method["pretrain_seconds"] >= 0.0
    assert report["methods"]["scratch"]["pretrain_seconds"] == 0.0
    assert report["methods"]["maskalign"]["pretrain_seconds"] > 0.0
    assert (report["methods"]["maskalign"]["mask_ratio"], report["methods"]["feature_distillation"]["mask_ratio"]) \
        == (demo.DEMO_MASK_RATIO, 0.0)
    assert "load_digits" in report["dataset"]
    assert report["budget_rule"].startswith("equal epochs")
    assert (report["train_images"], report["val_images"]) == (20, 20)
    assert report["teacher"]["val_top1"] is not None


def test_report_markdown_is_the_table(finished):
    text = (finished / "report.md").read_text()
    assert "| method | linear probe top-1 (%) | k-NN top-1 (%) | pre-training (s) |" in text
    report = json.loads((finished / "report.json").read_text())
    for name, method in report["methods"].items():
        assert f"| {name} | {method['linear_probe_top1']:.1f} | {method['knn_top1']:.1f} |" in text


def test_pictures_of_the_maskalign_run(finished):
    names = set(os.listdir(finished / "pictures"))
    assert {"overview.png", "alignment_matrix.png", "loss_curves.png", "mask_attentive_0.png"} <= names


def test_a_finished_demo_says_so_and_how_to_start_over(finished, capsys):
    before = (finished / "report.json").stat().st_mtime_ns
    assert demo.main(["--output_dir", str(finished), *TINY]) == 0
    said = capsys.readouterr().out
    assert "is complete" in said and f"rm -rf {finished}" in said and "| maskalign |" in said
    assert (finished / "report.json").stat().st_mtime_ns == before


def test_an_interrupted_demo_continues_where_it_stopped(finished):
    """Without the report and one evaluation, a rerun redoes only those: pre-training is not repeated."""
    checkpoint = finished / "maskalign" / "checkpoint-latest.pth"
    trained = checkpoint.stat().st_mtime_ns
    old = json.loads((finished / "report.json").read_text())
    os.remove(finished / "report.json")
    os.remove(finished / "maskalign" / "eval.json")
    assert demo.main(["--output_dir", str(finished), *TINY]) == 0
    assert checkpoint.stat().st_mtime_ns == trained
    new = json.loads((finished / "report.json").read_text())
    assert new["methods"]["feature_distillation"] == old["methods"]["feature_distillation"]
    assert new["methods"]["maskalign"]["pretrain_seconds"] == old["methods"]["maskalign"]["pretrain_seconds"]
