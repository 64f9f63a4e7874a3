"""The command lines of the README and of every page under docs/, checked against the code: parsed by each
program's own parser, the seed-README block tied to the flags the suite runs for real, the multi-node example run
under a fake srun, the grid commands run for real, and every relative link (anchors included) resolving inside the
repository."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, seed_flags

README_PATH = ROOT / "README.md"
# Every page is a contract as the README is: a new page is checked without being listed here.
PAGES = [README_PATH, *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
README = TEXT[README_PATH]
IDS = [str(page.relative_to(ROOT)) for page in PAGES]

from tools import flags_reference as FLAGS  # noqa: E402

PROGRAMS = {os.path.basename(p): p for p in FLAGS.PROGRAMS}


def code_blocks(text: str) -> list:
    """A page's fenced blocks (a list item's indented fence too) and its 4-space indented blocks outside fences,
    each as its logical lines (continuations joined)."""
    blocks, current, fence, run = [], [], None, []
    for line in text.splitlines() + [""]:
        stripped = line.lstrip()
        if stripped.startswith("```"):
            if fence is None:
                fence, current = len(line) - len(stripped), []
            else:
                blocks.append(current)
                fence = None
        elif fence is not None:
            current.append(stripped if line[:fence].strip() else line[fence:])
        elif line.startswith("    ") and not stripped.startswith(("-", "|")):
            run.append(line[4:])
        elif run:
            blocks.append(run)
            run = []
    joined = []
    for block in blocks:
        lines, acc = [], ""
        for line in block:
            if line.rstrip().endswith("\\"):
                acc += line.rstrip()[:-1] + " "
            else:
                lines.append((acc + line).strip())
                acc = ""
        joined.append(lines)
    return joined


SHELL_OPERATORS = {">", ">>", "2>", "2>&1", "<", "|", "&&", "||", ";", "&"}


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
            args = tokens[i + 1:]
            ends = [j for j, t in enumerate(args) if t in SHELL_OPERATORS]  # `> cell.sh`, `| tee`, `&& ...`
            return [(PROGRAMS[name], args[:ends[0]] if ends else args)]
        if " " in token and ".py" in token:
            return program_calls(token)
    return []


def inline_commands(text: str) -> list:
    """The inline code spans of a page's prose that are whole command lines (`python ...`, `accelerate launch ...`,
    with or without leading variable assignments), a span broken across lines joined."""
    prose = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    return [span for span in spans if re.match(r"(\w+=\S+ )*(python|accelerate launch) ", span)]


def page_calls(text: str) -> list:
    """(program, arguments, line) for every call of one of our programs in a page's code blocks and inline commands."""
    lines = [line for block in code_blocks(text) for line in block] + inline_commands(text)
    return [(program, args, line) for line in lines for program, args in program_calls(line)]


def test_the_pages_walk_through_every_program():
    """The extraction itself works: the four scripts and the tools appear, and no command line went missing."""
    calls = [call for text in TEXT.values() for call in page_calls(text)]
    seen = {program for program, _, _ in calls}
    assert {"finetuning_individual_CLIP.py", "finetuning_sequential.py", "eval_model.py", "tools/unlearn.py",
            "tools/import_model.py",
            "tools/generate_training_data.py", "tools/train_classifier.py", "tools/grid.py", "tools/report.py",
            "tools/benchmark.py", "tools/concept_inversion.py"} <= seen, seen
    # The 1,276-line README held 30 (26 in code blocks); moved to docs/ with the rest, they are 36 now.
    assert len(calls) >= 36, len(calls)
    assert len(page_calls(README)) >= 3  # the seed README's block stays in the README


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_command_line_of_a_page_parses_with_its_program_s_parser(page):
    for program, args, line in page_calls(TEXT[page]):
        elided = "..." in line  # '...' stands for flags left out: required flags may be missing
        args = [a.strip("[]") for a in args if a != "..."]
        parser = FLAGS.load_parser(program)
        parser.allow_abbrev = False  # the pages spell every flag out
        if elided:
            for action in parser._actions:
                action.required = False
        try:
            parser.parse_args(args)
        except SystemExit as err:
            if err.code == 0 and "--help" in args:
                continue
            pytest.fail(f"{page.name}: line does not parse ({program}, exit {err.code}): {line}")


def test_the_readme_s_seed_command_is_the_flag_set_the_suite_runs_through_accelerate(assets, tmp_path):
    (seed_line,) = [line for program, _, line in page_calls(README)
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
    """The pages' one srun block (docs/multi-gpu.md) under a fake srun that starts its command as 2 nodes."""
    (block,) = [b for text in TEXT.values() for b in code_blocks(text) if any(line.startswith("srun ") for line in b)]
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


def test_the_grid_commands_run_as_written():
    """`python tools/grid.py list/count slurm/example_grid.csv`, run for real from the repository root."""
    env = dict(os.environ, PYTHONPATH="")
    run = lambda *a: subprocess.run([sys.executable, "tools/grid.py", *a], cwd=ROOT, env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True, timeout=120).stdout
    lines = [line for text in TEXT.values() for block in code_blocks(text) for line in block]
    assert any(line.startswith("python tools/grid.py list slurm/example_grid.csv") for line in lines)
    assert "N=$(python tools/grid.py count slurm/example_grid.csv)" in lines
    assert run("count", "slurm/example_grid.csv").strip() == "8"
    listed = run("list", "slurm/example_grid.csv").splitlines()
    assert len(listed) == 8 and "finetuning_sequential/esd-x/golf_ball/related" in listed[0]


def anchors(text: str) -> set:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    found, counts, fenced = set(), {}, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
            counts[slug] = counts.get(slug, 0) + 1
    return found


def test_anchors_are_github_s():
    text = ("# A (`make demo`)\n## 2. Concept classifier: `tools/train_classifier.py`\n"
            "```\n# not a heading\n```\n# A (`make demo`)")
    assert anchors(text) == {"a-make-demo", "2-concept-classifier-toolstrain_classifierpy", "a-make-demo-1"}


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_a_page_s_links_resolve_inside_the_repository(page):
    """Relative to the page (docs pages link ../README.md and each other by name), to a file that exists, and to a
    heading of it when the link names one."""
    text = TEXT[page]
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_relative_to(ROOT.resolve()) and target.exists(), f"{page.name}: {link}"
        if anchor:
            assert target.suffix == ".md" and anchor in anchors(target.read_text()), f"{page.name}: {link}"
    assert "SPEC" not in text and "shared/" not in text
