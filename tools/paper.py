#!/usr/bin/env python
"""Print the commands that reproduce one cell of the paper's table (a concept and an unlearning method) from nothing.

    python tools/paper.py list
    python tools/paper.py commands --concept "golf ball" --method esd-x > cell.sh && bash -e cell.sh
    python tools/paper.py commands --concept van_gogh --method uce --json
    python tools/paper.py grid > slurm/paper_grid.csv     # every concept x the paper's nine methods, one grid

The inputs are ours, built by the paper's stated recipe (configs/paper/README.md),
not the paper's own lists. The commands run from the repository's root: the data
(tools/generate_training_data.py), the classifier (tools/train_classifier.py; for a
style the timm route), the unlearned model (tools/unlearn.py for the methods of its
registry; tools/import_model.py for a published checkpoint), the two individual scripts
and the sequential one on the related and the unrelated curriculum, eval_model.py
and tools/report.py. docs/paper.md says which settings follow the paper.

Two settings are chosen here, on purpose (tools/presets.py has the values):

- ``--compat reference`` (default; ``--compat none`` leaves it out): the paper's
  epochs-to-revival come from the published individual loop, in which after
  epoch 0 an "epoch" is one batch of the chunk and the optimizer, schedule and EMA
  carry over between chunks (docs/protocols.md, Differences). Our default loop
  trains full passes, so its epoch counts are not the paper's.
- ``--clip_epoch 89``: the published scripts' default budget, which the seed
  README's command lines leave in force (docs/demo.md cuts it to 30 for time; we
  found no other value in the published material).
"""

from __future__ import annotations

import json
import shlex
import sys
import textwrap

from common.errors import InputError, Parser, exit_on_input_error
from tools import presets

PROG = "paper.py"


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = Parser(description=__doc__.split("\n\n")[0], prog=PROG)
    p.add_argument("action", choices=("commands", "estimate", "list", "grid"),
                   help="commands: print one cell's commands; estimate: their GPU-hours and disk (tools/cost.py); "
                        "list: the concepts with presets; grid: every cell of --concepts x --methods as one "
                        "tools/grid.py file (slurm/paper_grid.csv)")
    p.add_argument("--concept", default=None, help="commands: a concept's name (any case) or its preset's slug")
    p.add_argument("--method", default=None,
                   help="commands: a method of tools/unlearn.py (esd-x, esd-u, uce, ac, salun, erasediff, sa), or another "
                        "method's name (its "
                        "published checkpoint is imported with tools/import_model.py)")
    p.add_argument("--concepts", nargs="+", default=None,
                   help="grid: the concepts (names or slugs; default: every preset)")
    p.add_argument("--methods", nargs="+", default=list(presets.PAPER_METHODS),
                   help="grid: the unlearning methods, tools/unlearn.py's names (esd: ESD-u for nudity, ESD-x "
                        "otherwise)")
    p.add_argument("--base_model", default=presets.BASE_MODEL,
                   help="the original model: diffusers directory or hub id (data, classifier images, unlearning)")
    p.add_argument("--work_dir", default="paper_runs", help="where every step writes (data, models, runs, report)")
    p.add_argument("--compat", default="reference", choices=("reference", "none"),
                   help="reference: the published loop's semantics (the paper's epochs to revival); none: ours")
    p.add_argument("--root", default=None, help="the presets' folder (default: the repository's configs/paper)")
    p.add_argument("--json", action="store_true", help="commands as a JSON list of {program, argv}")
    p.add_argument("--gpu", default="a100", choices=("a100", "h100"),
                   help="estimate: the assumed figures of this GPU (configs/gpu_figures/GPU.json)")
    p.add_argument("--figures", default=None,
                   help="estimate: measured figures instead (the JSON of tools/benchmark.py --sd14 --json FILE)")
    return p


def parse_args(argv=None):
    """The flags, checked: a command needs a known concept and a method (one line and exit 2 otherwise)."""
    args = build_parser().parse_args(argv)
    args.root = args.root or presets.DEFAULT_ROOT
    with exit_on_input_error(PROG):
        if args.action in ("commands", "estimate"):
            if not (args.concept and args.method):
                raise InputError(f"{args.action} needs --concept and --method")
            presets.load_preset(args.concept, args.root)  # an unknown concept is one line, before any output
        if args.action == "grid":
            args.concepts = [presets.load_preset(c, args.root).slug for c in args.concepts or
                             presets.available(args.root)]
            presets.grid_rows(args.concepts[:1], args.methods, args.base_model, args.compat, args.root)  # methods
    return args


def shell_line(program: str, argv, width: int = 100) -> str:
    """One command for a shell: each flag beside its value, continued lines of about ``width`` characters."""
    launcher = "accelerate launch" if program in presets.LAUNCHED else "python"
    groups, current = [], [launcher, program]
    for token in argv:
        if token.startswith("--"):
            groups.append(" ".join(current))
            current = []
        current.append(shlex.quote(token))
    groups.append(" ".join(current))
    lines = [groups[0]]
    for group in groups[1:]:
        if len(lines) > 1 and len(lines[-1]) + 1 + len(group) <= width:
            lines[-1] += " " + group
        else:
            lines.append(group)
    return " \\\n    ".join(lines)


def render_text(steps, header: str) -> str:
    """The plan as a shell script: notes as comments, each before its command."""
    lines = [f"# {line}" for line in header.splitlines()]
    for step in steps:
        lines.append("")
        for paragraph in step.note.splitlines():  # an indented line is a command to copy: kept whole
            lines += [f"# {paragraph}"] if paragraph.startswith(" ") else [
                f"# {line}" for line in textwrap.wrap(paragraph, 98, break_on_hyphens=False, break_long_words=False)]
        if step.program:
            lines.append(shell_line(step.program, step.argv))
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """Print the list, or one cell's plan as a shell script or JSON."""
    if args.action == "list":
        for key in presets.available(args.root):
            p = presets.load_preset(key, args.root)
            print(f"{p.slug:16s} {p.kind:10s} {p.name}")
        return 0
    if args.action == "grid":
        sys.stdout.write(presets.grid_csv(args.concepts, args.methods, args.base_model, args.compat, args.root))
        return 0
    preset = presets.load_preset(args.concept, args.root)
    steps = presets.plan(preset, args.method, args.base_model, args.work_dir, args.compat)
    if args.action == "estimate":  # the fine-tuning runs' cost; the data, classifier and unlearning steps are named
        from tools import cost

        figures = cost.load_figures(args.figures or cost.figures_path(args.gpu))
        runs = [s for s in steps if s.program and s.program.startswith("finetuning_")]
        estimates, totals = cost.estimate_runs([(s.program, list(s.argv)) for s in runs], figures)
        print(cost.table(estimates, totals, figures))
        others = sorted({s.program for s in steps if s.program and not s.program.startswith("finetuning_")})
        print(f"not estimated: {', '.join(others)}")
        return 0
    if args.json:
        print(json.dumps([{"program": s.program, "argv": list(s.argv)} for s in steps if s.program], indent=2))
        return 0
    header = (f"{preset.name} ({preset.kind}) x {args.method}: one cell of the paper's table, from nothing.\n"
              f"Inputs: {presets.shown(preset.directory)}/, {preset.provenance}.\n"
              "Run from the repository's root, in this order.")
    sys.stdout.write(render_text(steps, header))
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    with exit_on_input_error(PROG):
        raise SystemExit(main(arguments))
