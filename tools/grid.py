#!/usr/bin/env python
"""Render an experiment grid (CSV; see tools/gridspec.py) to launch commands, for slurm/grid.sbatch or by hand.

    python tools/grid.py count slurm/example_grid.csv
    python tools/grid.py list slurm/example_grid.csv --out_root runs
    python tools/grid.py command slurm/example_grid.csv --index 3 --num_processes 4
    python tools/grid.py output_dir slurm/example_grid.csv --index 3
    python tools/grid.py estimate slurm/example_grid.csv --gpu h100      # GPU-hours and disk (tools/cost.py)
"""

from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tools import cost  # noqa: E402
from tools import gridspec as grid  # noqa: E402
from common.errors import Parser  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402

PROG = "grid.py"


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = Parser(description=__doc__.split("\n\n")[0], prog=PROG)
    p.add_argument("action", choices=("count", "list", "command", "output_dir", "estimate"),
                   help="count: number of runs; list: index, name, output directory; command / output_dir: "
                        "those of run --index; estimate: GPU-hours and disk per run and in total (tools/cost.py)")
    p.add_argument("grid", help="grid CSV file")
    p.add_argument("--out_root", default="runs", help="root of the runs' output directories ({out_root})")
    p.add_argument("--index", type=int, default=None, help="the run (0-based; SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num_processes", type=int, default=1, help="processes (GPUs) over all machines")
    p.add_argument("--num_machines", type=int, default=1, help="machines (nodes) of the run")
    p.add_argument("--root", default=None,
                   help="command: a script that is not a file relative to the working directory is taken from this "
                        "repository root (slurm/grid.sbatch passes the one it found)")
    p.add_argument("--gpu", default=None, choices=tuple(cost.PEAK_TFLOPS),
                   help="estimate: the assumed figures of this GPU, configs/gpu_figures/GPU.json (default a100)")
    p.add_argument("--figures", default=None,
                   help="estimate: measured figures instead, the JSON of tools/benchmark.py --sd14 --json FILE")
    p.add_argument("--json", action="store_true", help="estimate: print JSON instead of the table")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with exit_on_input_error(PROG):
        runs = grid.read_grid(args.grid, args.out_root)
        if args.action in ("command", "output_dir"):
            if args.index is None:
                raise InputError(f"{args.action} needs --index")
            if not 0 <= args.index < len(runs):
                raise InputError(f"--index {args.index}: the grid has runs 0..{len(runs) - 1}")
        if args.num_processes < 1 or args.num_machines < 1:
            raise InputError("--num_processes and --num_machines must be >= 1")
        if args.gpu and args.figures:
            raise InputError("--gpu and --figures: give one (--figures replaces the assumed figures)")
        figures = None
        if args.action == "estimate":
            figures = cost.load_figures(args.figures or cost.figures_path(args.gpu or "a100"))
    return argparse.Namespace(**{**vars(args), "runs": runs, "figures": figures})  # the parsed flags stay as parsed


def main(args):
    if args.action == "count":
        print(len(args.runs))
    elif args.action == "list":
        for r in args.runs:
            print(f"{r.index}\t{r.name}\t{r.output_dir}")
    elif args.action == "output_dir":
        print(args.runs[args.index].output_dir)
    elif args.action == "estimate":
        with exit_on_input_error(PROG):
            estimates, totals = cost.estimate_runs(args.runs, args.figures, args.num_processes)
            attacks = cost.estimate_attacks(args.runs, args.figures, args.num_processes)  # their own table
        if args.json:
            print(cost.as_json(estimates, totals, args.figures, args.num_processes, attacks))
            return
        print(cost.table(estimates, totals, args.figures, args.num_processes))
        if attacks:
            print("\n" + cost.attack_table(attacks, args.figures))
    else:
        with exit_on_input_error(PROG):  # a batch the processes do not divide, a script found nowhere
            print(grid.launch_command(args.runs[args.index], args.num_processes, args.num_machines, args.root))


if __name__ == "__main__":
    main(parse_args())
