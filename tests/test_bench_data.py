"""benchmarks/bench_data.py runs every backend's path (the gpu hook on CPU tensors) in its smoke mode (issue #9)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_data  # noqa: E402


def test_smoke_mode_measures_every_backend(tmp_path, capsys):
    bench_data.main(["--smoke", "--gen_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "500x375" in out and "21,520 img/s" in out
    for line in ("pil      per core", "fast     1 workers", "gpu      device hook", "fast / pil per core"):
        assert line in out
