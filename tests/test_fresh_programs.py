"""The programs added for the paper's cells and the cost estimates, each started as a new interpreter (as a user
types them), with assertions on what they print."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _run(*argv, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_paper_prints_a_cell_s_commands_and_their_cost():
    cmds = json.loads(_run(ROOT / "tools" / "paper.py", "commands", "--concept", "golf ball", "--method", "ac",
                           "--json"))
    (unlearn,) = [c["argv"] for c in cmds if c["program"] == "tools/unlearn.py"]
    assert unlearn[unlearn.index("--anchor") + 1] == "ball"  # the preset's anchor
    assert [c["program"] for c in cmds][-2:] == ["eval_model.py", "tools/report.py"]
    out = _run(ROOT / "tools" / "paper.py", "estimate", "--concept", "golf ball", "--method", "esd-x")
    assert "estimate from assumed figures" in out and "total (6 runs)" in out


def test_grid_estimate_prints_the_example_grid_s_total():
    out = _run(ROOT / "tools" / "grid.py", "estimate", ROOT / "slurm" / "example_grid.csv")
    total = next(line for line in out.splitlines() if "total (8 runs)" in line)
    assert "32,000" in total  # 8 sequential runs x 500 images x 8 epochs


def test_benchmark_prints_every_unlearning_method_s_memory():
    from tools.unlearning import METHODS

    out = _run(ROOT / "tools" / "benchmark.py", "--memory", "--unlearning")
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert sorted(r.split("`")[1] for r in rows) == sorted(METHODS)
