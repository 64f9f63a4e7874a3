"""SLURM for every tool, submitted from any directory: the pipeline grid renders a command each program's own parser
accepts, with the processes it supports; the templates find the repository from outside it (REVIVAL_ROOT, the
installed package) and leave the user's relative paths as typed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tools import gridspec as grid
from tools.flags_reference import load_parser
from conftest import ROOT

SLURM = ROOT / "slurm"
PIPELINE = SLURM / "pipeline_grid.csv"
# Each step of the pipeline, in the grid's order, with the indices of its runs (docs/multi-gpu.md submits by them).
STEPS = [("tools/generate_training_data.py", "0-3"), ("tools/train_classifier.py", "4"), ("tools/unlearn.py", "5-6"),
         ("finetuning_sequential.py", "7-10"), ("tools/concept_inversion.py", "11-12"),
         ("tools/attack_prompts.py", "13-14"), ("eval_model.py", "15-18")]


def _split(cmd: str):
    """(launcher options, script, script arguments) of a rendered `accelerate launch` command."""
    words = shlex.split(cmd)
    at = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[2:at], words[at], words[at + 1:]


def _indices(text: str) -> list:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def test_every_pipeline_row_renders_a_command_its_program_parses():
    runs = grid.read_grid(str(PIPELINE), "runs")
    assert [r.index for r in runs] == [i for _, span in STEPS for i in _indices(span)]
    for script, span in STEPS:
        assert {runs[i].script for i in _indices(span)} == {script}, span
    parsers = {}
    for run in runs:
        for gpus in (1, 2):
            launcher, script, argv = _split(grid.launch_command(run, num_processes=gpus))
            shared = grid.shares_work(script)
            processes = gpus if shared else 1  # a single-process tool never runs twice over
            assert launcher == ["--multi_gpu"] * (processes > 1) + ["--num_processes", str(processes),
                                                                     "--num_machines", "1"], (script, gpus)
            finetuning = os.path.basename(script).startswith("finetuning_")
            assert ("--resume_from_checkpoint=latest" in argv) == finetuning
            batches = [a for a in argv if a.startswith("--train_batch_size")]
            assert batches == ([f"--train_batch_size={10 // gpus}"] if finetuning else []), (script, batches)
            parser = parsers.setdefault(script, load_parser(script))
            try:
                parser.parse_args(argv)
            except SystemExit as err:
                pytest.fail(f"{script} does not parse its grid row (exit {err.code}): {shlex.join(argv)}")
    # Positional arguments come first, each word filled in (a concept with a space stays one argument).
    _, _, argv = _split(grid.launch_command(runs[15]))
    assert argv[:3] == ["runs/finetuning_sequential/esd-x/golf_ball/related", "classifiers/golf_ball", "golf ball"]


def test_the_docs_submit_whole_steps_by_their_indices():
    """docs/multi-gpu.md's dependency chain: every run submitted once, each array made of whole steps."""
    arrays = re.findall(r"--array=(\S+) slurm/grid\.sbatch \$G runs", (ROOT / "docs" / "multi-gpu.md").read_text())
    assert sorted(i for a in arrays for i in _indices(a)) == list(range(19)), arrays
    steps = [set(_indices(span)) for _, span in STEPS]
    for a in arrays:
        assert set(_indices(a)) == set().union(*(s for s in steps if s & set(_indices(a)))), a


def test_which_programs_share_their_work_among_processes():
    """The ones whose pages say they split their work under accelerate launch, and no other."""
    assert {s for s, _ in STEPS if grid.shares_work(s)} == {
        "tools/generate_training_data.py", "finetuning_sequential.py", "tools/attack_prompts.py"}
    assert grid.shares_work("/abs/finetuning_individual_CLIP.py") and not grid.shares_work("my_tool.py")


def test_args_column_errors(tmp_path):
    g = tmp_path / "g.csv"
    g.write_text("script,method,concept,dataset,args\ns,m,c,d,\"a 'b\"\n")
    with pytest.raises(grid.InputError, match=r"column args: cannot split"):
        grid.read_grid(str(g), "R")
    g.write_text("script,method,concept,dataset,args\ns,m,c,d,{nope}\n")
    with pytest.raises(grid.InputError, match="cannot fill"):
        grid.read_grid(str(g), "R")


def _cluster(tmp_path, **extra):
    """A submit directory outside the repository, a fake accelerate that records its arguments, no PYTHONPATH:
    the repository must be found as a user's sbatch would find it."""
    submit = tmp_path / "submit"
    submit.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv"
    (bin_dir / "accelerate").write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(log))}\n")
    (bin_dir / "accelerate").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REVIVAL_", "PYTHONPATH"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(submit),
               SLURM_JOB_ID="7", **extra)
    return submit, env, log


def _submit(template, args, env, log, expect=0):
    if log.exists():
        log.unlink()
    r = subprocess.run(["bash", str(SLURM / template), *args], env=env, capture_output=True, text=True, timeout=60,
                       cwd="/")
    assert r.returncode == expect, r.stdout + r.stderr
    return (log.read_text().split("\0")[:-1] if log.exists() else None), r


def test_run_one_from_any_directory(tmp_path):
    submit, env, log = _cluster(tmp_path, SLURM_GPUS_ON_NODE="2")
    argv, _ = _submit("run_one.sbatch", ["out/one", "finetuning_sequential.py", "--train_data_dir=data/x",
                                         "--validation_prompts", "prompts/a b.txt"], env, log)
    assert argv == ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    str(ROOT / "finetuning_sequential.py"), "--train_data_dir=data/x", "--validation_prompts",
                    "prompts/a b.txt", "--output_dir=out/one", "--resume_from_checkpoint=latest"]
    # A tool that runs single-process gets one process whatever the job's GPUs.
    argv, _ = _submit("run_one.sbatch", ["out/two", "tools/unlearn.py", "--method", "uce"], env, log)
    assert argv[1:6] == ["--num_processes", "1", "--num_machines", "1", str(ROOT / "tools" / "unlearn.py")]
    # A script that is a file relative to the submit directory is the user's, left as typed.
    (submit / "tools").mkdir()
    (submit / "tools" / "unlearn.py").write_text("")
    argv, _ = _submit("run_one.sbatch", ["out/three", "tools/unlearn.py"], env, log)
    assert argv[5] == "tools/unlearn.py"
    _, r = _submit("run_one.sbatch", ["out/four", "tools/nothing.py"], env, log, expect=2)
    assert r.stderr.strip() == f"run_one.sbatch: tools/nothing.py: no such file in {submit} or in {ROOT}"


def test_grid_from_any_directory(tmp_path):
    _, env, log = _cluster(tmp_path, SLURM_GPUS_ON_NODE="2", SLURM_ARRAY_TASK_ID="13", SLURM_ARRAY_JOB_ID="9")
    # The grid named as in the docs (relative to the repository), its paths relative to the submit directory.
    argv, _ = _submit("grid.sbatch", ["slurm/pipeline_grid.csv", "runs"], env, log)
    assert argv[:7] == ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        str(ROOT / "tools" / "attack_prompts.py")]
    assert "--target_images=data/golf_ball/positive" in argv
    assert argv[-1] == "--output_dir=runs/attacks/unlearndiffatk/esd-x/golf_ball"
    # (A single-process tool's one process and eval_model.py's positional arguments: the rendering test above.)


def test_revival_root_and_no_root(tmp_path):
    other = tmp_path / "checkout"  # another checkout, named by REVIVAL_ROOT: its files and its code first
    (other / "slurm").mkdir(parents=True)
    shutil.copy(SLURM / "requeue.sh", other / "slurm" / "requeue.sh")
    (other / "finetuning_sequential.py").write_text("")
    (tmp_path / "bin2").mkdir()
    env_log = tmp_path / "env"
    submit, env, log = _cluster(tmp_path, REVIVAL_ROOT=str(other))
    (tmp_path / "bin" / "accelerate").write_text(
        f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(log))}\necho \"$PYTHONPATH\" > {env_log}\n")
    argv, _ = _submit("run_one.sbatch", ["out", "finetuning_sequential.py"], env, log)
    assert argv[5] == str(other / "finetuning_sequential.py")
    assert env_log.read_text().split(":")[0].strip() == str(other)
    _, r = _submit("run_one.sbatch", ["out", "finetuning_sequential.py"], dict(env, REVIVAL_ROOT=str(submit)), log,
                   expect=2)
    assert r.stderr.strip() == f"run_one.sbatch: REVIVAL_ROOT={submit} is not the repository (no slurm/requeue.sh there)"
    # No REVIVAL_ROOT, a Python without the package, a submit directory that is not the repository: one line, exit 2.
    no_package = tmp_path / "bin2" / "python"
    no_package.write_text("#!/bin/bash\nexit 1\n")
    no_package.chmod(0o755)
    env.pop("REVIVAL_ROOT")
    for template in ("run_one.sbatch", "grid.sbatch"):
        _, r = _submit(template, ["out", "finetuning_sequential.py"], dict(env, PYTHON=str(no_package)), log,
                       expect=2)
        assert len(r.stderr.strip().splitlines()) == 1 and "cannot find the repository: set REVIVAL_ROOT" in r.stderr
        assert r.stderr.startswith(template), r.stderr


def test_the_methods_grid_unlearns_then_fine_tunes_every_method():
    """slurm/methods_grid.csv: one unlearned model per method (its own flags parse; a training method resumes on
    requeue, UCE's closed form takes no --resume), then the sequential runs of every method on both curricula,
    each reading the model its unlearning row wrote."""
    from tools.unlearning import METHODS

    runs = grid.read_grid(str(SLURM / "methods_grid.csv"), "runs")
    unlearning = [r for r in runs if r.script == "tools/unlearn.py"]
    assert [r.index for r in unlearning] == list(range(len(unlearning)))  # the first array, then the second
    header = (SLURM / "methods_grid.csv").read_text()
    assert f"--array=0-{len(unlearning) - 1} " in header and f"--array={len(unlearning)}-{len(runs) - 1} " in header
    assert sorted(r.method for r in unlearning) == sorted(METHODS)  # every method of the registry, once
    models = {}
    for run in runs:
        _, script, argv = _split(grid.launch_command(run))
        args = load_parser(script).parse_args(argv)
        if script == "tools/unlearn.py":
            assert args.method == run.method and args.resume is (True if METHODS[run.method].trains else None)
            models[run.method] = args.output_dir
        else:
            assert args.pretrained_model_name_or_path == models[run.method]  # written by an earlier row
    assert len(runs) - len(unlearning) == 2 * len(METHODS)
