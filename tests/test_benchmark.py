"""tools/benchmark.py in its short CI mode: it runs every path and prints every figure (no timing asserted)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_benchmark_short_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--short", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("cached_samples_per_s", "uncached_samples_per_s", "bare_fwd_bwd_samples_per_s",
                "validation_batched_images_per_s", "validation_one_at_a_time_images_per_s",
                "nudity_detector_s_per_100_images",
                "run_levers_on_s", "run_levers_off_s"):
        assert figures[key] > 0, key
        assert key in proc.stdout
    assert figures["device"] == "cpu" and figures["model"] == "tiny"
    # The ratios printed are the ratios of the figures printed.
    assert figures["cache_speedup"] == pytest.approx(figures["cached_samples_per_s"] / figures["uncached_samples_per_s"])
    assert figures["run_speedup"] == pytest.approx(figures["run_levers_off_s"] / figures["run_levers_on_s"])
