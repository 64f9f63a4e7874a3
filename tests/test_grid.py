"""Experiment grids and the SLURM templates (issue 7): rendering, bash syntax, requeue on preemption."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tools import gridspec as grid
from common.errors import InputError
from conftest import ROOT

SLURM = ROOT / "slurm"


def test_example_grid_renders_the_cross_product():
    runs = grid.read_grid(str(SLURM / "example_grid.csv"), "runs")
    assert len(runs) == 8  # 2 methods x 2 concepts x 2 datasets
    assert [(r.method, r.concept, r.dataset) for r in runs[:3]] == [
        ("esd-x", "golf ball", "related"), ("esd-x", "golf ball", "unrelated"), ("esd-x", "church", "related")]
    cmd = shlex.split(grid.launch_command(runs[5], num_processes=2))
    assert cmd[:8] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "finetuning_sequential.py"]
    flags = cmd[8:]
    # The README command's flags (the latent cache needs --center_crop), and the protocol's global batch of 10.
    assert {"--center_crop", "--random_flip", "--gradient_checkpointing"} <= set(flags)
    assert [f for f in flags if f.startswith("--train_batch_size")] == ["--train_batch_size=5"]
    assert "--pretrained_model_name_or_path=models/golf_ball/uce" in flags
    assert "--train_data_dir=data/golf_ball/unrelated" in flags
    assert "--curriculum=50,100,150,200,250,300,350,400,450,500" in flags
    assert "--use_ema" in flags  # "on": a bare flag
    assert flags[-5:-2] == ["--tag=method=uce", "--tag=concept=golf ball", "--tag=data=unrelated"]
    assert flags[-2:] == ["--output_dir=runs/finetuning_sequential/uce/golf_ball/unrelated",
                          "--resume_from_checkpoint=latest"]
    # The rendered command line is accepted by the script's own parser (paths aside).
    import finetuning_sequential

    with pytest.raises(SystemExit) as err:
        finetuning_sequential.parse_args(flags)
    assert err.value.code == 2  # models/golf_ball/uce does not exist here: one clear error, not a parse failure


def test_the_global_batch_is_the_grid_s_on_any_number_of_gpus():
    """--train_batch_size is per process in the scripts; a grid's cell is the protocol's batch, divided among the
    GPUs the job got, and refused with the arithmetic where they do not divide it."""
    run = grid.read_grid(str(SLURM / "example_grid.csv"), "runs")[0]
    for gpus, per_process in ((1, 10), (2, 5), (5, 2), (10, 1)):
        flags = shlex.split(grid.launch_command(run, num_processes=gpus))
        assert [f for f in flags if f.startswith("--train_batch_size")] == [f"--train_batch_size={per_process}"]
    with pytest.raises(InputError, match=r"--train_batch_size 10 on 4 processes: each would take 10 and the global "
                                         r"batch would be 40, not the protocol's 10; run on 1, 2, 5, 10 GPUs"):
        grid.launch_command(run, num_processes=4)
    # Without the column, the scripts' default (10) is the protocol's batch.
    bare = grid.GridRun(0, "m", "c", "d", "finetuning_individual_CLIP.py", (), "out")
    assert "--train_batch_size=5" in shlex.split(grid.launch_command(bare, num_processes=2))
    other = grid.GridRun(0, "m", "c", "d", "tools/unlearn.py", (), "out")  # not a fine-tuning script: untouched
    assert not any(f.startswith("--train_batch_size") for f in shlex.split(grid.launch_command(other, 2)))


def test_grid_sbatch_keeps_the_global_batch_with_one_and_two_gpus(tmp_path):
    """The job script with SLURM_GPUS_ON_NODE=1 and =2 (a fake accelerate logs its command line)."""
    env = _fake_cluster(tmp_path)
    bin_dir = tmp_path / "bin"
    (bin_dir / "accelerate").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'accelerate.log'}\n")
    (bin_dir / "accelerate").chmod(0o755)
    for gpus in ("1", "2"):
        r = subprocess.run(["bash", str(SLURM / "grid.sbatch"), str(SLURM / "example_grid.csv"), str(tmp_path / "runs")],
                           env=dict(env, SLURM_ARRAY_TASK_ID="0", SLURM_GPUS_ON_NODE=gpus), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    one, two = ((tmp_path / "accelerate.log").read_text().splitlines())
    for line, gpus, batch in ((one, 1, 10), (two, 2, 5)):
        args = line.split()
        assert args[args.index("--num_processes") + 1] == str(gpus) and f"--train_batch_size={batch}" in args
        assert ("--multi_gpu" in args) == (gpus > 1)


def test_grid_placeholders_bare_flags_and_errors(tmp_path):
    g = tmp_path / "g.csv"
    g.write_text("script,method,concept,dataset,--output_dir,--seed,--use_ema,--scale_lr\n"
                 "finetuning_individual_CLIP.py,m1,Van Gogh,d1;d2,{out_root}/x/{concept_slug}-{dataset},3,on,\n")
    runs = grid.read_grid(str(g), "R")
    assert [r.output_dir for r in runs] == ["R/x/van_gogh-d1", "R/x/van_gogh-d2"]
    assert runs[0].flags == (("--seed", "3"), ("--use_ema", None))  # an empty cell leaves --scale_lr out
    for text, msg in (("script,method,concept\nx,a,b\n", "missing column"),
                      ("script,method,concept,dataset,lr\nx,a,b,c,1\n", "neither axes nor --flags"),
                      ("script,method,concept,dataset,--x\ns,a,b,c,{nope}\n", "cannot fill"),
                      ("script,method,concept,dataset,--output_dir\ns,a;b,c,d,same\n", "also used by run 0"),
                      ("script,method,concept,dataset\n", "no runs")):
        g.write_text(text)
        with pytest.raises(InputError, match=msg):
            grid.read_grid(str(g), "R")


def test_grid_tool_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tools" / "grid.py"), *a], capture_output=True,
                                    text=True, cwd=ROOT, timeout=120)
    r = run("count", str(SLURM / "example_grid.csv"))
    assert r.returncode == 0 and r.stdout.strip() == "8"
    r = run("output_dir", str(SLURM / "example_grid.csv"), "--index", "8")
    assert r.returncode == 2 and "runs 0..7" in r.stderr


@pytest.mark.parametrize("name", ["requeue.sh", "run_one.sbatch", "grid.sbatch"])
def test_slurm_templates_parse(name):
    r = subprocess.run(["bash", "-n", str(SLURM / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


FAKE_RUN = r'''
import argparse, json, os, signal, sys, time
p = argparse.ArgumentParser()
p.add_argument("--output_dir"); p.add_argument("--resume_from_checkpoint"); p.add_argument("--mode")
a, _ = p.parse_known_args()  # a stand-in for a fine-tuning script: its other flags are not read
os.makedirs(a.output_dir, exist_ok=True)
open(os.path.join(a.output_dir, "started"), "a").write(f"{a.resume_from_checkpoint}\n")
if a.mode == "finish":
    sys.exit(0)
def on_signal(*_):  # what the real scripts do: checkpoint, marker, exit 75
    time.sleep(1.0)  # a slow checkpoint: the job script must wait for it
    json.dump({"checkpoint": "checkpoint-1"}, open(os.path.join(a.output_dir, "PREEMPTED"), "w"))
    sys.exit(75)
signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
open(os.path.join(a.output_dir, "ready"), "w").close()
time.sleep(120)
sys.exit(1)
'''


def _fake_cluster(tmp_path):
    """A grid of two fake runs, a fake scontrol that logs its arguments, and accelerate on PATH."""
    (tmp_path / "finetuning_fake.py").write_text(FAKE_RUN)
    (tmp_path / "grid.csv").write_text(f"script,method,concept,dataset,--mode\n"
                                       f"{tmp_path / 'finetuning_fake.py'},m,c,d,preempt\n"
                                       f"{tmp_path / 'finetuning_fake.py'},m,c,e,finish\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    return dict(os.environ, PATH=path, PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="124",
                SLURM_ARRAY_JOB_ID="123", ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT))


def test_grid_job_requeues_on_preemption_and_finishes_otherwise(tmp_path):
    env = _fake_cluster(tmp_path)
    out_root = tmp_path / "runs"
    cmd = ["bash", str(SLURM / "grid.sbatch"), str(tmp_path / "grid.csv"), str(out_root)]
    # Task 1 finishes: exit 0, no requeue (through the stand-in launcher: only task 0's signal needs the real one).
    stand_in = tmp_path / "stand_in"
    stand_in.mkdir()
    _launcher_that_runs_the_script(stand_in)
    r = subprocess.run(cmd, env=dict(env, SLURM_ARRAY_TASK_ID="1", PATH=f"{stand_in}:{env['PATH']}"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out_root / "finetuning_fake" / "m" / "c" / "e" / "started").read_text() == "latest\n"
    assert not (tmp_path / "scontrol.log").exists()
    # Task 0 is preempted: SIGUSR1 to the batch shell (as --signal=B:USR1 does) reaches the run, which
    # checkpoints; the job waits for it, then requeues itself and exits 75.
    out = out_root / "finetuning_fake" / "m" / "c" / "d"
    proc = subprocess.Popen(cmd, env=dict(env, SLURM_ARRAY_TASK_ID="0"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "ready").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, log
    assert (out / "PREEMPTED").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "123_0"]
    assert "requeueing 123_0" in log


def _launcher_that_runs_the_script(bin_dir):
    """A stand-in `accelerate` on PATH that runs the script with the flags after it, as `accelerate launch` on one
    process does, without the launcher's start-up (the requeue test above goes through the real one)."""
    (bin_dir / "accelerate").write_text('#!/bin/bash\nwhile [ $# -gt 0 ] && [[ "$1" != *.py ]]; do shift; done\n'
                                        'exec "$PYTHON" "$@"\n')
    (bin_dir / "accelerate").chmod(0o755)


def test_run_one_job_passes_flags_and_output_dir(tmp_path):
    env = _fake_cluster(tmp_path)
    _launcher_that_runs_the_script(tmp_path / "bin")
    out = tmp_path / "one run"  # a space: the command must be quoted
    r = subprocess.run(["bash", str(SLURM / "run_one.sbatch"), str(out), str(tmp_path / "finetuning_fake.py"), "--mode",
                        "finish"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "started").read_text() == "latest\n"
    r = subprocess.run(["bash", str(SLURM / "run_one.sbatch"), str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    # A tool (not a fine-tuning script) gets no --resume_from_checkpoint, which it would refuse: it continues a
    # killed run from its output directory by itself.
    tool = tmp_path / "attack_tool.py"
    tool.write_text((tmp_path / "finetuning_fake.py").read_text())
    r = subprocess.run(["bash", str(SLURM / "run_one.sbatch"), str(tmp_path / "tool run"), str(tool), "--mode",
                        "finish"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "tool run" / "started").read_text() == "None\n"
    grid_tool = grid.GridRun(0, "m", "c", "d", "tools/attack_prompts.py", (), "out")
    assert "--resume_from_checkpoint=latest" not in grid.launch_command(grid_tool)


def test_seed_is_a_grid_axis(tmp_path):
    g = tmp_path / "g.csv"
    g.write_text("script,method,concept,dataset,seed,--curriculum\n"
                 "finetuning_sequential.py,uce,golf ball,related,0;1;2,\"50,100\"\n")
    runs = grid.read_grid(str(g), "R")
    assert [r.seed for r in runs] == ["0", "1", "2"]
    assert [r.output_dir for r in runs] == [f"R/finetuning_sequential/uce/golf_ball/related/seed{i}" for i in range(3)]
    cmd = shlex.split(grid.launch_command(runs[2]))
    assert "--seed=2" in cmd and "--tag=seed=2" in cmd
    g.write_text("script,method,concept,dataset,seed,--seed\nx,a,b,c,1,2\n")
    with pytest.raises(InputError, match="seed axis and a --seed column"):
        grid.read_grid(str(g), "R")
    g.write_text("script,method,concept,dataset,seed\nx,a,b,c,one\n")
    with pytest.raises(InputError, match="seed must list integers"):
        grid.read_grid(str(g), "R")


def test_unlearn_seed_is_an_axis_of_the_unlearning_run_and_of_the_revival_runs_on_its_models(tmp_path):
    g = tmp_path / "g.csv"
    g.write_text("script,method,concept,dataset,seed,unlearn_seed,--method,--pretrained_model_name_or_path\n"
                 "tools/unlearn.py,esd-x,golf ball,-,,0;1,esd-x,base\n"
                 "finetuning_sequential.py,esd-x,golf ball,related,0;1;2,0;1,,"
                 "R/unlearn/{method}/{concept_slug}/-/useed{unlearn_seed}\n"
                 "finetuning_sequential.py,control,golf ball,related,0;1;2,,,base\n")
    runs = grid.read_grid(str(g), "R")
    unlearn, revival, control = runs[:2], runs[2:8], runs[8:]
    # The unlearning runs: the axis is their --seed and their output directory's last part.
    assert [dict(r.flags)["--seed"] for r in unlearn] == ["0", "1"]
    assert [r.output_dir for r in unlearn] == [f"R/unlearn/esd-x/golf_ball/-/useed{u}" for u in (0, 1)]
    # The revival runs: each (fine-tuning seed, unlearning seed) pair reads that seed's model and is tagged.
    assert [(r.seed, r.unlearn_seed) for r in revival] == [(s, u) for s in "012" for u in "01"]
    cmd = shlex.split(grid.launch_command(revival[3]))  # seed 1, unlearning seed 1
    assert "--pretrained_model_name_or_path=R/unlearn/esd-x/golf_ball/-/useed1" in cmd
    assert "--seed=1" in cmd and "--tag=unlearn_seed=1" in cmd and cmd.count("--seed=1") == 1
    assert revival[3].output_dir == "R/finetuning_sequential/esd-x/golf_ball/related/seed1/useed1"
    assert revival[3].name.endswith("/seed1/useed1")
    assert [r.unlearn_seed for r in control] == [None] * 3  # an empty cell: no axis on that row
    # An axis that could not change what runs is refused.
    g.write_text("script,method,concept,dataset,unlearn_seed,--pretrained_model_name_or_path\n"
                 "finetuning_sequential.py,esd-x,golf ball,related,0;1,models/esd-x\n")
    with pytest.raises(InputError, match="no cell names the unlearned model"):
        grid.read_grid(str(g), "R")
    g.write_text("script,method,concept,dataset,seed,unlearn_seed\ntools/unlearn.py,esd-x,b,-,0,1\n")
    with pytest.raises(InputError, match="leave its seed and --seed cells empty"):
        grid.read_grid(str(g), "R")
    g.write_text("script,method,concept,dataset,unlearn_seed\ntools/unlearn.py,esd-x,b,-,x\n")
    with pytest.raises(InputError, match="unlearn_seed must list integers"):
        grid.read_grid(str(g), "R")
