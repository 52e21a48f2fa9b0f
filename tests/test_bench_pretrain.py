"""benchmarks/bench_pretrain.py: its settings, its report and a tiny CPU run through every part but the
reference (issue #8). It prints figures; nothing here times anything."""
import logging
import types

import pytest

from benchmarks import bench_pretrain
from benchmarks.bench_pretrain import Setting, step_ratio

TINY = ["--device", "cpu", "--model", "maskalign_vit_tiny_patch16", "--model_kwargs", "depth=2",
        "--teacher", "timm:vit_tiny_patch16_224", "--batch_size", "2", "--warmup", "1", "--steps", "1"]


def parsed(argv, monkeypatch):
    """The arguments `main` hands to `run` (nothing is built)."""
    seen = {}
    monkeypatch.setattr(bench_pretrain, "run", lambda args: seen.setdefault("args", args))
    bench_pretrain.main(argv)
    return seen["args"]


def test_the_reference_is_compared_with_ours_in_its_alignment_form(monkeypatch, tmp_path):
    assert parsed(["--device", "cpu"], monkeypatch).align == "dynamic"
    pytest.importorskip("transformers")  # --ref needs it
    assert parsed(["--device", "cpu", "--ref", str(tmp_path)], monkeypatch).align == "official"
    assert parsed(["--device", "cpu", "--ref", str(tmp_path), "--align", "dynamic"], monkeypatch).align == "dynamic"


def test_align_through_model_kwargs_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_pretrain.main(["--device", "cpu", "--model_kwargs", "align=official"])
    assert exc.value.code == 2 and "--align" in capsys.readouterr().err


def test_the_reference_is_timed_right_after_ours_in_its_precision():
    args = types.SimpleNamespace(device="cpu", mask_ratio=0.7, loop=False, amp="bf16", ref="ref", ref_amp="none",
                                 compile=True, compile_fd=False)
    names = [name for name, *_ in bench_pretrain.plan(args)]
    assert names == ["ours MaskAlign bf16 eager", "ours MaskAlign none eager", "reference none",
                     "ours MaskAlign bf16 compiled", "ours FD bf16 eager"]


def test_step_ratio_pairs_the_blocks_of_each_round():
    ours = Setting("ours", "none", None, 1.0, times=[1.0, 2.0, 0.9])
    ref = Setting("reference", "none", None, 1.0, times=[1.0, 2.5, 1.0])
    # medians 1.0 / 1.0; per round 1.0, 0.8, 0.9
    assert step_ratio(ours, ref) == "1.00; per round: median 0.90, range 0.80-1.00"
    ours, reference = (Setting(name, "none", None, 1.0, times=[t]) for name, t in (("o", 3.0), ("r", 4.0)))
    assert step_ratio(ours, reference) == "0.75"


def test_a_tiny_cpu_run_reports_every_setting(capsys):
    logger = logging.getLogger("maskalign")
    level = logger.level
    bench_pretrain.main(TINY + ["--rounds", "2", "--loop", "--num_workers", "0"])
    assert logger.level == level  # quiet while timing only: later code (and tests) read its INFO lines
    out = capsys.readouterr().out
    assert "align dynamic" in out
    for name in ("ours MaskAlign none eager", "ours FD none eager"):
        assert f"{name}: " in out and "GFLOP per image counted" in out
    assert "loop / bare step img/s: " in out
    assert "MaskAlign / FD step time (FD none eager): " in out
