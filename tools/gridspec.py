"""Experiment grids for cluster job arrays (tools/grid.py, slurm/grid.sbatch).

A grid is a CSV file, one line per group of runs. The columns ``method``,
``concept`` and ``dataset`` name the axes; a cell may list several values
separated by ``;`` and the line expands to their cross product (methods x
concepts x datasets). ``script`` is the fine-tuning script to run. Every column
whose name starts with ``--`` is passed as that flag; its cell may use
``{method}``, ``{concept}``, ``{concept_slug}``, ``{dataset}`` and
``{out_root}``; an empty cell leaves the flag out and ``on`` passes it bare
(``--use_ema``); a column named ``--flag*`` passes its cell's words (split as a shell would: ``'a golf ball'
'a tennis ball'``) as the flag's several values. Without an ``--output_dir`` column a run writes to
``{out_root}/{script}/{method}/{concept_slug}/{dataset}``. Every fine-tuning run gets
``--resume_from_checkpoint latest``, so the same command starts and restarts it (the tools continue a killed run
from their output directory without the flag, which they do not take), and a tools/unlearn.py run of a method that
trains gets ``--resume`` (its checkpoint, when a requeued job finds one).

An optional ``seed`` column is a fourth axis (``0;1;2``): each seed is its own
run with ``--seed``, a ``{seed}`` placeholder, and ``seed{N}`` appended to the
default output directory (an empty cell: no seed axis on that row); tools/report.py
aggregates runs that differ only in their seed.

An optional ``args`` column holds a program's positional arguments (eval_model.py's
``MODEL_PATHS CLASSIFIER CONCEPT``): the cell is split as a shell would split it,
each word's placeholders are filled, and the words come first, before the flags.

Only the fine-tuning scripts and the tools that share their work among processes
(``SHARED_WORK``) get several processes; any other program would run whole once per
process, so it gets one, whatever the job's GPUs.
"""

from __future__ import annotations

import csv
import itertools
import os
import shlex
from dataclasses import dataclass
from typing import Dict, List, Optional

from common.errors import InputError
from common.results import slug

AXES = ("method", "concept", "dataset")
UNLEARN_SEED = "unlearn_seed"  # the unlearning run's seed axis (column and placeholder)
UNLEARN_SCRIPT = "unlearn.py"  # the program whose --seed the unlearn_seed axis sets
BARE = "on"
MANY = "*"  # a flag column named --flag* passes its cell's words as the flag's several values
ARGS = "args"  # the column of positional arguments
# Tools that split their work among the processes of `accelerate launch` (docs/workflow.md, docs/attacks.md; each
# tested on two processes). The fine-tuning scripts (finetuning_*) do too; every other program runs single-process.
SHARED_WORK = ("generate_training_data.py", "attack_prompts.py")


@dataclass(frozen=True)
class GridRun:
    index: int
    method: str
    concept: str
    dataset: str
    script: str
    flags: tuple  # ((flag, value or None), ...) in column order
    output_dir: str
    seed: Optional[str] = None  # the seed axis' value, when the grid has one
    args: tuple = ()  # positional arguments, placeholders filled (the args column)
    unlearn_seed: Optional[str] = None  # the unlearning seed axis' value, when the row has one

    @property
    def name(self) -> str:
        name = f"{os.path.splitext(os.path.basename(self.script))[0]}/{self.method}/{slug(self.concept)}/{self.dataset}"
        name = name if self.seed is None else f"{name}/seed{self.seed}"
        return name if self.unlearn_seed is None else f"{name}/useed{self.unlearn_seed}"


def _fill(template: str, values: Dict[str, str], where: str) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise InputError(f"{where}: cannot fill {template!r} ({err}); placeholders are "
                         "{method} {concept} {concept_slug} {dataset} {out_root} {seed} {unlearn_seed}") from None


def read_grid(path: str, out_root: str) -> List[GridRun]:
    """Every run of the grid file, in file order then method, concept, dataset order."""
    if not os.path.isfile(path):
        raise InputError(f"GRID {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(line for line in f if line.strip() and not line.lstrip().startswith("#")))
    if not rows:
        raise InputError(f"GRID {path}: no runs")
    columns = list(rows[0].keys())
    missing = [c for c in ("script", *AXES) if c not in columns]
    if missing:
        raise InputError(f"GRID {path}: missing column(s) {', '.join(missing)}")
    has_seed = "seed" in columns
    if has_seed and "--seed" in columns:
        raise InputError(f"GRID {path}: a seed axis and a --seed column; keep one")
    unknown = [c for c in columns if c not in ("script", "seed", UNLEARN_SEED, ARGS, *AXES) and not c.startswith("--")]
    if unknown:
        raise InputError(f"GRID {path}: column(s) {', '.join(unknown)} are neither axes nor --flags")
    runs: List[GridRun] = []
    seen = {}
    for line_no, row in enumerate(rows, 2):
        where = f"GRID {path} row {line_no - 1}"
        if None in row or any(v is None for v in row.values()):
            raise InputError(f"{where}: wrong number of cells")
        axes = []
        for axis in AXES:
            values = [v.strip() for v in row[axis].split(";") if v.strip()]
            if not values:
                raise InputError(f"{where}: empty {axis}")
            axes.append(values)
        script = row["script"].strip()
        if not script:
            raise InputError(f"{where}: empty script")
        # An empty seed cell: no seed axis on that row (an unlearning row beside seeded revival rows).
        seeds = [v.strip() for v in row["seed"].split(";") if v.strip()] if has_seed and row["seed"].strip() else [None]
        if seeds != [None] and not all(v.lstrip("-").isdigit() for v in seeds):
            raise InputError(f"{where}: seed must list integers separated by ';'")
        unlearn_seeds = _unlearn_seeds(row, columns, script, seeds != [None], where)
        for method, concept, dataset, seed, unlearn_seed in itertools.product(*axes, seeds, unlearn_seeds):
            values = {"method": method, "concept": concept, "concept_slug": slug(concept), "dataset": dataset,
                      "out_root": out_root, "seed": seed if seed is not None else "",
                      UNLEARN_SEED: unlearn_seed if unlearn_seed is not None else ""}
            flags = []
            output_dir = None
            positional = _positional(row.get(ARGS) or "", values, f"{where} column {ARGS}")
            for col in columns:
                if not col.startswith("--") or not row[col].strip():
                    continue
                cell = row[col].strip()
                if col.endswith(MANY):  # several values: the cell's words, split as a shell would
                    flags.append((col[:-len(MANY)], _positional(cell, values, f"{where} column {col}")))
                    continue
                value = None if cell == BARE else _fill(cell, values, f"{where} column {col}")
                if col == "--output_dir":
                    output_dir = value
                elif col != "--resume_from_checkpoint":
                    flags.append((col, value))
            stem = os.path.splitext(os.path.basename(script))[0]
            output_dir = output_dir or os.path.join(out_root, stem, method, slug(concept), dataset,
                                                    *([f"seed{seed}"] if seed is not None else []),
                                                    *([f"useed{unlearn_seed}"] if unlearn_seed is not None else []))
            if output_dir in seen:
                raise InputError(f"{where}: output directory {output_dir} is also used by run {seen[output_dir]}")
            seen[output_dir] = len(runs)
            if seed is not None:
                flags.append(("--seed", seed))
            if unlearn_seed is not None and os.path.basename(script) == UNLEARN_SCRIPT:
                flags.append(("--seed", unlearn_seed))  # the unlearning run's own seed
            runs.append(GridRun(len(runs), method, concept, dataset, script, tuple(flags), output_dir, seed,
                                positional, unlearn_seed))
    return runs


def _unlearn_seeds(row: Dict[str, str], columns: List[str], script: str, has_seed: bool, where: str) -> list:
    """The row's unlearn_seed values ([None]: no such axis on this row); InputError when the axis could not change
    what the row runs: a tools/unlearn.py row with a seed axis or --seed too, or a revival row none of whose cells
    names the model of each unlearning seed with {unlearn_seed}."""
    cell = (row.get(UNLEARN_SEED) or "").strip()
    if not cell:
        return [None]
    values = [v.strip() for v in cell.split(";") if v.strip()]
    if not values or not all(v.lstrip("-").isdigit() for v in values):
        raise InputError(f"{where}: {UNLEARN_SEED} must list integers separated by ';'")
    if os.path.basename(script) == UNLEARN_SCRIPT:
        if has_seed or (row.get("--seed") or "").strip():
            raise InputError(f"{where}: {UNLEARN_SEED} sets tools/unlearn.py's --seed; leave its seed and --seed "
                             "cells empty")
    elif not any("{" + UNLEARN_SEED + "}" in (row.get(c) or "") for c in columns if c.startswith("--") or c == ARGS):
        raise InputError(f"{where}: an {UNLEARN_SEED} axis, but no cell names the unlearned model of each seed with "
                         "{" + UNLEARN_SEED + "} (e.g. --pretrained_model_name_or_path models/{concept_slug}/"
                         "{method}/useed{" + UNLEARN_SEED + "})")
    return values


def _positional(cell: str, values: Dict[str, str], where: str) -> tuple:
    """The args cell's words (split as a shell would, so a quoted concept stays one word), placeholders filled."""
    try:
        words = shlex.split(cell)
    except ValueError as err:
        raise InputError(f"{where}: cannot split {cell!r} ({err})") from None
    return tuple(_fill(word, values, where) for word in words)


def shares_work(script: str) -> bool:
    """Whether the program splits its work among several processes (else each process would run it whole)."""
    name = os.path.basename(script)
    return name.startswith("finetuning_") or name in SHARED_WORK


def resolve_script(script: str, root: str) -> str:
    """The script as given when it is a file relative to the working directory, else under the repository ``root``
    (a job submitted from elsewhere names tools/X.py as the grid does); InputError when it is neither."""
    if os.path.isfile(script):
        return script
    under_root = os.path.join(root, script)
    if os.path.isfile(under_root):
        return under_root
    raise InputError(f"script {script}: no such file in {os.getcwd()} or in the repository {root}")


DEFAULT_BATCH = 10  # the fine-tuning scripts' --train_batch_size default (common/cli.py): the protocol's batch


def per_process_batch(run: GridRun, processes: int) -> int:
    """The --train_batch_size each of ``processes`` processes gets so that the global batch stays the grid's (its
    --train_batch_size cell is the protocol's batch, as on one GPU); InputError when the processes do not divide it."""
    cells = dict(run.flags)
    batch = int(cells.get("--train_batch_size") or DEFAULT_BATCH)
    if batch % processes:
        divisors = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
        raise InputError(f"--train_batch_size {batch} on {processes} processes: each would take {batch} and the "
                         f"global batch would be {batch * processes}, not the protocol's {batch}; run on {divisors} "
                         "GPUs (numbers that divide it)")
    return batch // processes


def launch_command(run: GridRun, num_processes: int = 1, num_machines: int = 1, root: Optional[str] = None) -> str:
    """The shell command of one run: ``accelerate launch`` with its flags; a fine-tuning script resumes from its
    latest checkpoint and gets its batch divided among the processes (the global batch is the grid's whatever the
    GPUs); a program that does not share its work gets one process. With ``root``, the script is resolved against
    it when it is not a file here (see resolve_script)."""
    if not shares_work(run.script):
        num_processes = num_machines = 1  # N processes would each run it whole, writing the same outputs
    script = resolve_script(run.script, root) if root else run.script
    cmd = ["accelerate", "launch"]
    if num_processes > 1:
        cmd += ["--multi_gpu"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", str(num_machines), script, *run.args]
    finetuning = os.path.basename(run.script).startswith("finetuning_")
    for flag, value in run.flags:
        if flag == "--train_batch_size" and finetuning:
            continue  # below, per process
        if isinstance(value, tuple):  # a --flag* column: the flag, then each of its words
            cmd += [flag, *value]
        else:
            cmd += [flag] if value is None else [f"{flag}={value}"]
    if finetuning:
        cmd += [f"--train_batch_size={per_process_batch(run, num_processes)}"]
    if finetuning:
        # The run's names, so tools/report.py labels it from its config.json, whatever the paths are called.
        cmd += [f"--tag=method={run.method}", f"--tag=concept={run.concept}", f"--tag=data={run.dataset}"]
        if run.seed is not None:
            cmd += [f"--tag=seed={run.seed}"]
        if run.unlearn_seed is not None:
            cmd += [f"--tag={UNLEARN_SEED}={run.unlearn_seed}"]
    cmd += [f"--output_dir={run.output_dir}"]
    if finetuning:  # the only programs with the flag; the tools continue from their output directory unasked
        cmd += ["--resume_from_checkpoint=latest"]
    elif trains_unlearning(run):  # a requeued unlearning job continues from its checkpoint (none yet: starts afresh)
        cmd += ["--resume"]
    return shlex.join(cmd)


def trains_unlearning(run: GridRun) -> bool:
    """True for a tools/unlearn.py run of a method that trains (and so takes --resume; UCE's closed form does not)."""
    if os.path.basename(run.script) != "unlearn.py":
        return False
    from tools.unlearning import METHODS

    method = dict(run.flags).get("--method")
    return method in METHODS and METHODS[method].trains
