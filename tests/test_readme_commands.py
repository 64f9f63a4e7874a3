"""The README's command lines, checked against the code: parsed by each program's own parser, the seed-README
block tied to the flags the suite runs for real, the multi-node example run under a fake srun, the grid commands
run for real, and no link to a file outside the repository."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, seed_flags

README = (ROOT / "README.md").read_text()


from tools import flags_reference as FLAGS  # noqa: E402
PROGRAMS = {os.path.basename(p): p for p in FLAGS.PROGRAMS}


def code_blocks(text: str) -> list:
    """The README's fenced blocks and 4-space indented blocks, each as its logical lines (continuations joined)."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if fenced:
                blocks.append(current)
            current, fenced = [], not fenced
        elif fenced:
            current.append(line)
    indented, run = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("    ") and not line.lstrip().startswith(("-", "|")):
            run.append(line[4:])
        elif run:
            indented.append(run)
            run = []
    joined = []
    for block in blocks + indented:
        lines, acc = [], ""
        for line in block:
            if line.rstrip().endswith("\\"):
                acc += line.rstrip()[:-1] + " "
            else:
                lines.append((acc + line).strip())
                acc = ""
        joined.append(lines)
    return joined


def program_calls(line: str) -> list:
    """(program, arguments) for each of our programs a shell line runs (also inside $(...) and bash -c '...')."""
    line = re.sub(r"^\$ ", "", line)
    inner = re.findall(r"\$\(([^()]*\.py[^()]*)\)", line)
    if inner:
        return [c for part in inner for c in program_calls(part)]
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    for i, token in enumerate(tokens):
        name = os.path.basename(token)
        if token.endswith(".py") and name in PROGRAMS and (token == name or token == PROGRAMS[name]):
            return [(PROGRAMS[name], tokens[i + 1:])]
        if " " in token and ".py" in token:
            return program_calls(token)
    return []


def readme_calls() -> list:
    return [(program, args, line) for block in code_blocks(README) for line in block
            for program, args in program_calls(line)]


def test_every_readme_command_line_parses_with_its_program_s_parser():
    calls = readme_calls()
    seen = {program for program, _, _ in calls}
    # The four scripts and the tools the README walks through all appear (the extraction itself works).
    assert {"finetuning_individual_CLIP.py", "finetuning_sequential.py", "eval_model.py", "tools/unlearn.py",
            "tools/import_model.py",
            "tools/generate_training_data.py", "tools/train_classifier.py", "tools/grid.py", "tools/report.py",
            "tools/benchmark.py", "tools/concept_inversion.py"} <= seen, seen
    assert len(calls) >= 18
    for program, args, line in calls:
        elided = "..." in line  # '...' stands for flags left out: required flags may be missing
        args = [a.strip("[]") for a in args if a != "..."]
        parser = FLAGS.load_parser(program)
        parser.allow_abbrev = False  # the README spells every flag out
        if elided:
            for action in parser._actions:
                action.required = False
        try:
            parser.parse_args(args)
        except SystemExit as err:
            pytest.fail(f"README line does not parse ({program}, exit {err.code}): {line}")


def test_the_readme_s_seed_command_is_the_flag_set_the_suite_runs_through_accelerate(assets, tmp_path):
    (seed_line,) = [line for program, _, line in readme_calls()
                    if program == "finetuning_individual_CLIP.py" and "--clip_threshold=0.31" in line]
    readme_flags = dict(a.split("=", 1) if "=" in a else (a, None) for a in shlex.split(seed_line)[3:])
    suite_flags = dict(a.split("=", 1) if "=" in a else (a, None) for a in seed_flags(assets, str(tmp_path)))
    # The suite adds only a shorter sampling for speed (tests/test_individual_clip.py runs it for real).
    assert set(suite_flags) - set(readme_flags) == {"--num_inference_steps"}
    assert set(readme_flags) <= set(suite_flags)
    for flag in ("--use_ema", "--center_crop", "--random_flip", "--gradient_checkpointing", "--mixed_precision",
                 "--learning_rate", "--max_grad_norm", "--lr_scheduler", "--lr_warmup_steps", "--train_batch_size",
                 "--gradient_accumulation_steps", "--clip_threshold", "--save_model", "--caption_column"):
        assert readme_flags[flag] == (None if suite_flags[flag] is None else str(suite_flags[flag])), flag


def test_the_readme_says_to_activate_the_environment_before_its_commands():
    assert README.index("source .venv/bin/activate") < README.index("accelerate launch")


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_multi_node_example_gives_each_node_its_own_machine_rank(tmp_path):
    """The README's srun block under a fake srun that starts its command as 2 nodes (SLURM_NODEID 0 and 1)."""
    (block,) = [b for b in code_blocks(README) if any(line.startswith("srun ") for line in b)]
    script = "\n".join(block).replace(" ...", "")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "launches.txt"
    _write_exe(bin_dir / "srun", '#!/bin/bash\nfor ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@"; done\n')
    _write_exe(bin_dir / "accelerate", f'#!/bin/bash\necho "$*" >> {log}\n')
    _write_exe(bin_dir / "scontrol",
               '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    subprocess.run(["bash", "-c", script], env=env, check=True, timeout=60)
    launches = [shlex.split(line) for line in log.read_text().splitlines()]
    assert len(launches) == 2
    for rank, argv in enumerate(launches):
        opts = dict(zip(argv, argv[1:]))
        assert opts["--machine_rank"] == str(rank)
        assert (opts["--num_machines"], opts["--num_processes"], opts["--main_process_ip"]) == ("2", "8", "gpu07")
        assert argv[-1] == "finetuning_sequential.py"


def test_readme_grid_commands_run_as_written():
    """`python tools/grid.py list/count slurm/example_grid.csv`, run for real from the repository root."""
    env = dict(os.environ, PYTHONPATH="")
    run = lambda *a: subprocess.run([sys.executable, "tools/grid.py", *a], cwd=ROOT, env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True, timeout=120).stdout
    assert "python tools/grid.py list slurm/example_grid.csv" in README
    assert "N=$(python tools/grid.py count slurm/example_grid.csv)" in README
    assert run("count", "slurm/example_grid.csv").strip() == "8"
    listed = run("list", "slurm/example_grid.csv").splitlines()
    assert len(listed) == 8 and "finetuning_sequential/esd-x/golf_ball/related" in listed[0]


def test_readme_links_stay_inside_the_repository():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "no local links found: the pattern is wrong"
    for link in local:
        target = (ROOT / link).resolve()
        assert target.is_relative_to(ROOT.resolve()) and target.exists(), link
    assert "SPEC" not in README and "shared/" not in README
