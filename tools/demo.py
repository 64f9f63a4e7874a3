#!/usr/bin/env python
"""The built-in demo: concept revival in a toy world, on a CPU (`make demo`).

Phases: build (or reuse) the toy world; calibrate the thresholds; fine-tune the
unlearned models (ESD-x, UCE) with the four scripts through `accelerate
launch`; attack them and the base model with the prompt attacks
(tools/attack_prompts.py, budgets cut: ATTACKS); evaluate; print the revival
and probes tables and write plots (tools/report.py).

Every sequential run also scores retention prompts (the target's neighbours
and unrelated concepts, toy_world.RETENTION), and a control run fine-tunes the
base model (never unlearned) on the related curriculum (tagged role=control:
tools/report.py pairs it with the unlearned runs).

`--run_seeds 0,1,2` runs instead only the sequential ESD-x and UCE runs on both
data sets and the control on the related data, once per fine-tuning seed (same world), and reports them
with bootstrap intervals over the seeds.

Numbers: the demo runs under the pinned numeric environment of
common/numerics.py (AVX2 kernels, MKL's SSE2 branch, one thread per
process), which every process it starts inherits, so any x86-64 AVX2 machine
computes the same bits. `--no_pin` (`make demo PIN=0`) lets torch choose
kernels and threads: faster on a big machine, other numbers.

Threshold rule (documented in docs/demo.md): the paper's CLIP threshold (0.31)
sits just under the original model's own score on the concept, about a fifth
of the way down to the unlearned models' scores. Here it is the base model's
mean CLIP cosine on the target prompts minus a fifth of the gap to the best
unlearned model's score. The paper's classifier threshold 0.3 sits far above
its unlearned models' accuracy (near 0); in the toy world UCE already scores
0.2 (card), so the classifier threshold is the paper's 0.3 raised to halfway
between the highest unlearned accuracy and the base model's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tools import child_env, toy_world  # noqa: E402
from tools.toy_world import expected as demo_expected  # noqa: E402
from common import numerics  # noqa: E402
from common.errors import exit_on_input_error  # noqa: E402
from common.evaluation import format_table  # noqa: E402
from common.results import read_jsonl  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default=toy_world.DEFAULT_DIR, help="toy world directory (built once, cached)")
    p.add_argument("--out", default=None, help="run outputs, tables and plots (default demo_runs/, or "
                                               "demo_runs_seeds/ with --run_seeds)")
    p.add_argument("--scale", default="full", choices=sorted(toy_world.SCALES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip_epoch", type=int, default=30,
                   help="epoch budget of the individual runs (epochs 0..31 of each of chunks 4-9, validated every 2nd "
                        "epoch; the published scripts' default is 89: cut so that `make demo` fits on 2 cores, each "
                        "individual run restarting every chunk from the unlearned model)")
    p.add_argument("--num_train_epochs", type=int, default=8, help="epochs per chunk of the sequential runs (paper 8)")
    p.add_argument("--num_inference_steps", type=int, default=10)
    p.add_argument("--no_pin", action="store_true",
                   help="run without the pinned numeric environment (common/numerics.py): torch's own kernels and "
                        "threads, faster on a big machine, but the numbers differ from docs/demo.md's (make demo PIN=0)")
    p.add_argument("--jobs", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="runs at a time (default: 2, or 1 on a one-core machine); each run is one single-threaded "
                        "process under the pin, so the numbers do not depend on this")
    p.add_argument("--write_expected", action="store_true",
                   help="record this pinned demo's figures as the expected values (tools/toy_world/"
                        "expected_demo.json) instead of checking them")
    p.add_argument("--run_seeds", default=None,
                   help="e.g. 0,1,2: only the sequential ESD-x/UCE runs on the related and unrelated data and the "
                        "control on the related data, once per fine-tuning seed, and the table over seeds "
                        "(default --out: demo_runs_seeds/)")
    p.add_argument("--unlearn_seeds", default=None,
                   help="e.g. 0,1,2 (with --run_seeds): the methods of --unlearn_methods unlearned again at each of "
                        "these seeds, each model fine-tuned sequentially on the related data at every --run_seeds "
                        "seed, and the report's table of where the Revival Point's spread comes from (default "
                        "--out: demo_runs_useeds/)")
    p.add_argument("--unlearn_methods", default="esd-x,ac",
                   help="with --unlearn_seeds: the methods (toy-world settings of tools/toy_world/build.py; UCE's "
                        "closed form draws nothing, so its seed changes nothing)")
    p.add_argument("--methods", default=None,
                   help="e.g. all, or esd-x,uce,ac: the unlearning methods side by side (`make demo-methods`): each "
                        "erases the red circle with its toy-world settings (tools/toy_world/build.py), is scored "
                        "against the world's erasure targets, then fine-tuned sequentially on the related and the "
                        "unrelated data beside one control; the methods table and one figure of every method's "
                        "curves per data set (default --out: demo_runs_methods/)")
    args = p.parse_args(argv)
    if args.methods is not None:
        from tools.toy_world.build import TOY_METHODS

        args.methods = list(TOY_METHODS) if args.methods.strip() == "all" else [
            m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in TOY_METHODS]
        if unknown or not args.methods:
            p.error(f"--methods {','.join(unknown) or '(none)'}: choose among all, {', '.join(TOY_METHODS)}")
        if args.run_seeds is not None:
            p.error("--methods and --run_seeds: one at a time")
    args.run_seeds = _seed_list(p, "--run_seeds", args.run_seeds)
    args.unlearn_seeds = _seed_list(p, "--unlearn_seeds", args.unlearn_seeds)
    args.unlearn_methods = [m.strip() for m in args.unlearn_methods.split(",") if m.strip()]
    if args.unlearn_seeds is not None:
        if args.run_seeds is None:
            p.error("--unlearn_seeds needs --run_seeds (the fine-tuning seeds of each unlearned model)")
        unknown = [m for m in args.unlearn_methods if m not in UNLEARN_SEED_METHODS]
        if unknown or not args.unlearn_methods:
            p.error(f"--unlearn_methods {','.join(unknown) or '(none)'}: choose among "
                    f"{', '.join(UNLEARN_SEED_METHODS)}")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected at least 1")
    default_out = ("demo_runs_methods" if args.methods else "demo_runs_useeds" if args.unlearn_seeds
                   else "demo_runs_seeds" if args.run_seeds else "demo_runs")
    args.out = args.out or os.path.join(ROOT, default_out)
    return args


UNLEARN_SEED_METHODS = ("esd-x", "ac")  # the methods tools/toy_world/build.py's unlearn_argv makes and that draw


def _seed_list(p, flag: str, value):
    """A comma-separated list of integers (None when not given); argparse's error otherwise."""
    if value is None:
        return None
    try:
        seeds = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag} {value!r}: expected comma-separated integers, e.g. 0,1,2")
    if not seeds:
        p.error(f"{flag}: give at least one seed")
    return seeds


# The flags whose defaults the expected values (tools/toy_world/expected_demo.json) were computed with.
NUMBER_FLAGS = ("scale", "seed", "clip_epoch", "num_train_epochs", "num_inference_steps")


def expected_section(args) -> str | None:
    """The expected values' section this demo is checked against; None when a number-changing flag is not its
    default (or the demo is unpinned: other kernels, other bits)."""
    defaults = parse_args([])
    if args.no_pin or any(getattr(args, f) != getattr(defaults, f) for f in NUMBER_FLAGS):
        return None
    if args.methods:
        return "demo-methods " + ",".join(args.methods)
    return demo_expected.section_name(args.run_seeds, args.unlearn_seeds, args.unlearn_methods)


def calibrate(card: dict) -> dict:
    """Thresholds from the world's own scores (see the module docstring)."""
    models = card["figures"]["models"]
    methods = [m for m in toy_world.UNLEARN_METHODS if m in models]
    base = models["base"]["clip_score_target"]
    unlearned = max(models[m]["clip_score_target"] for m in methods)
    base_acc = models["base"]["classifier_acc_target"]
    unlearned_acc = max(models[m]["classifier_acc_target"] for m in methods)
    return {"clip_threshold": round(base - 0.2 * (base - unlearned), 4),
            "bc_threshold": round(max(0.3, (base_acc + unlearned_acc) / 2), 4),
            "base_clip": base, "best_unlearned_clip": unlearned,
            "base_classifier_acc": base_acc, "highest_unlearned_classifier_acc": unlearned_acc}


def flag_list(flags) -> list:
    """A run's flags as its command line's arguments: None a bare flag, a list value repeats the flag (--tag); a
    list of arguments (flags with several values each: tools/unlearn.py's) as it is."""
    if isinstance(flags, list):
        return list(flags)
    return [k if x is None else f"{k}={x}" for k, v in flags.items() for x in (v if isinstance(v, list) else [v])]


def launch(script: str, flags: dict, log_path: str, accelerate: bool = True) -> int:
    """Run one script through `accelerate launch` (1 CPU process), or a tool with plain python; its output goes to
    log_path."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"] if accelerate else [sys.executable]
    cmd += [os.path.join(ROOT, script), *flag_list(flags)]
    env = child_env(HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"  {script} -> {os.path.splitext(os.path.basename(log_path))[0]}: exit {rc}, {time.time() - t0:.0f} s",
          flush=True)
    return rc


def _sequential_flags(args, p, th, retention) -> dict:
    return {"--num_train_epochs": args.num_train_epochs, "--model_path": p["classifier"],
            "--clip_threshold": th["clip_threshold"], "--bc_threshold": th["bc_threshold"],
            "--clip_model": p["clip"], "--curriculum_checkpoints": "4,9", "--use_ema": None,
            "--retention_prompts": retention}


INDIVIDUAL_FIRST_CHUNK = 4  # the individual runs' first chunk (--start_CL): see demo_plan

# LoRA: rank 4 on every attention projection; an adapter learns from zero, so 10x the full fine-tuning rate.
LORA_FLAGS = {"--params": "lora", "--lora_rank": 4, "--learning_rate": "1e-3"}
INVERSION = {"images": 20, "steps": 200, "every": 50, "learning_rate": "5e-3", "batch": 4, "initializer": "circle"}

CONTROL_TAGS = ["role=control", "method=base"]  # tools/report.py pairs a role=control run with the others


def demo_plan(args, p, th, retention) -> list:
    """(script, run name, model, data, flags) of `make demo`'s runs."""
    plan = []
    seq = _sequential_flags(args, p, th, retention)
    for method in toy_world.UNLEARN_METHODS:
        model = p["unlearned"][method]
        if not os.path.isdir(model):
            print(f"  {method}: no unlearned model in the world; skipped")
            continue
        for data in ("related", "unrelated"):
            plan.append(("finetuning_sequential.py", f"seq-{method}-{data}", model, data, dict(seq)))
    # One run of each individual script, the demo's costliest runs (each chunk restarts from the unlearned model):
    # the classifier one on the first unlearned model (ESD-x), the CLIP one on the last (UCE).
    models = [m for m in toy_world.UNLEARN_METHODS if os.path.isdir(p["unlearned"][m])]
    if models:
        # Chunks 4-9 (--start_CL 4): the six concepts near the target (red squares, blue circles, red triangles,
        # yellow circles, orange circles, red rings), the chunks where revival is in question; chunks 0-3 (general
        # concepts) are left out for time. Both scripts validate every 2nd epoch here (the CLIP script's published
        # cadence; the classifier script's is every epoch), halving the validations of a 32-epoch budget.
        individual = {"--clip_epoch": args.clip_epoch, "--validation_epochs": 2, "--start_CL": INDIVIDUAL_FIRST_CHUNK,
                      "--save_model": "False"}
        plan.append(("finetuning_individual_Classifier.py", f"clf-{models[0]}-related", p["unlearned"][models[0]],
                     "related", {"--model_path": p["classifier"], "--bc_threshold": th["bc_threshold"], **individual}))
        plan.append(("finetuning_individual_CLIP.py", f"clip-{models[-1]}-related", p["unlearned"][models[-1]],
                     "related", {"--clip_threshold": th["clip_threshold"], "--clip_model": p["clip"], **individual}))
    # The other revival probe through the same scripts: a LoRA adapter instead of the UNet's weights.
    for method in toy_world.UNLEARN_METHODS:
        if os.path.isdir(p["unlearned"][method]):
            plan.append(("finetuning_sequential.py", f"seq-lora-{method}-related", p["unlearned"][method], "related",
                         {**seq, **LORA_FLAGS}))
    # The controls: the original model on the related curriculum (full and LoRA fine-tuning), no pipeline kept.
    plan.append(("finetuning_sequential.py", "seq-control-related", p["sd_base"], "related",
                 {**seq, "--save_model": "False", "--tag": CONTROL_TAGS}))
    plan.append(("finetuning_sequential.py", "seq-control-lora-related", p["sd_base"], "related",
                 {**seq, **LORA_FLAGS, "--save_model": "False", "--tag": CONTROL_TAGS}))
    return plan


def concept_images(args) -> str:
    """20 drawn images of the target (made once): concept inversion's training images, UnlearnDiffAtk's targets."""
    from tools import tiny

    images = os.path.join(args.out, "concept_images")
    if not os.path.isdir(images):
        tiny.shapes_dataset(images, [toy_world.TARGET], per_concept=INVERSION["images"], size=toy_world.RESOLUTION,
                            seed=args.seed + 1)
    return images


def inversion_tasks(args, p, th) -> list:
    """tools/concept_inversion.py on each unlearned model (Task list): 20 drawn images of the target, the target's
    validation prompts with its name replaced by the placeholder."""
    images = concept_images(args)
    name = " ".join(toy_world.TARGET)  # "red circle"
    prompts = os.path.join(args.out, "inversion_prompts.txt")
    with open(p["prompts_target"]) as src, open(prompts, "w") as dst:
        dst.write("".join(line.replace(name, "<concept>") for line in src if line.strip()))
    tasks = []
    for method in toy_world.UNLEARN_METHODS:
        out = os.path.join(args.out, f"inversion-{method}")
        flags = {"--pretrained_model_name_or_path": p["unlearned"][method], "--train_data_dir": images,
                 "--validation_prompts": prompts, "--initializer_token": INVERSION["initializer"],
                 "--concept_name": name, "--learning_rate": INVERSION["learning_rate"],
                 "--train_batch_size": INVERSION["batch"], "--max_train_steps": INVERSION["steps"],
                 "--validation_steps": INVERSION["every"], "--resolution": toy_world.RESOLUTION, "--center_crop": None,
                 "--num_inference_steps": args.num_inference_steps, "--seed": args.seed, "--clip_model": p["clip"],
                 "--clip_threshold": th["clip_threshold"], "--model_path": p["classifier"],
                 "--bc_threshold": th["bc_threshold"], "--output_dir": out, "--quiet": None,
                 "--tag": [f"method={method}", f"concept={toy_world.caption(*toy_world.TARGET)}"]}
        # No checkpoints: an interrupted probe starts afresh.
        tasks.append(Task(f"inversion-{method}", "tools/concept_inversion.py", out, flags, accelerate=False,
                          resumable=False))
    return tasks


# The prompt attacks (issue #28, docs/attacks.md): each attack on ESD-x, UCE and the base model, whose row is the
# positive control (its pre-ASR is the ceiling). The published budgets cost minutes to hours per prompt on a CPU; these
# are cut so that the 12 runs take about 2.5 minutes two at a time on 2 cores. Timed alone, pinned, on the toy world
# (2026-12-02, 4 prompts): 22-36 s per run on ESD-x or UCE (about 7 s of it loading), 8-9 s per run on the base model
# (its prompts already succeed: nothing to search); 270 s of one core in all, about 135 s two at a time.
ATTACKS = {
    # Published (Diffusion-MU-Attack configs): 50 timesteps x 40 Adam steps = 2000 steps, judged after each
    # timestep. Cut to 10 timesteps (50, 150, ..., 950 of 1000) x 10 steps = 100 steps (5%), judged after each.
    "unlearndiffatk": {"--timesteps": 10, "--steps_per_timestep": 10},
    # Published (joycenerd/P4D configs): 3000 iterations, judged every 50 (61 judged prompts). Cut to 100 iterations
    # (3.3%) judged every 25 (5 judged prompts).
    "p4d-n": {"--iterations": 100, "--judge_every": 25},
    "p4d-k": {"--iterations": 100, "--judge_every": 25},
    # Published (InversePrompt.ipynb): population 200, 3000 generations (~360,000 encodings). Cut to population 100,
    # 120 generations (~7,200 encodings, 2%).
    "ringabell": {"--population": 100, "--generations": 120},
}
# The baselines beside the attacks (the UnlearnDiffAtk paper's tables carry them), on the unlearned models only (the
# base model's prompts already succeed): the prompt as written (the pre-ASR), random tokens in UnlearnDiffAtk's slots
# and the prompt on new seeds, each with the judged budget of the demo's UnlearnDiffAtk (10 judged prompts: one per
# timestep), so an attack's ASR reads against what random tokens or lucky seeds reach at the same cost.
BASELINES = {"none": {}, "random": {"--tries": 10}, "seed_search": {"--seeds": 10}}
# The cases: the first 4 of the target's 10 phrasings (published: a whole prompt set, e.g. 142 I2P prompts), each
# prompt that counts judged again on 2 held-out seeds (the tool's default: 3).
ATTACK_CASES = {"prompts": 4, "heldout_seeds": 2}


def ringabell_pairs() -> list:
    """Ring-A-Bell's pairs file lines: each phrasing of the target, a tab, the same phrasing of every other concept
    of the world (the concept vector: what "red circle" adds to a caption over any other colour and shape)."""
    target = toy_world.concept_prompts(toy_world.TARGET)
    return [f"{with_c}\t{without}" for c in toy_world.CONCEPTS if c != toy_world.TARGET
            for with_c, without in zip(target, toy_world.concept_prompts(c))]


def attacked_models(p) -> list:
    """(name, model directory, tags) of the attacked models: the unlearned ones present, then the base model tagged
    as tools/report.py's control (its row: the positive control)."""
    concept = f"concept={toy_world.caption(*toy_world.TARGET)}"  # the other probes' concept: the same table rows
    models = [(m, p["unlearned"][m], [f"method={m}", concept]) for m in toy_world.UNLEARN_METHODS
              if os.path.isdir(p["unlearned"][m])]
    return models + [("base", p["sd_base"], CONTROL_TAGS + [concept])]


def attack_tasks(args, p, th) -> list:
    """tools/attack_prompts.py, each attack of ATTACKS on each attacked model (Task list), on the first
    ATTACK_CASES["prompts"] phrasings of the target's validation prompts."""
    with open(p["prompts_target"]) as f:
        phrasings = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    prompts = os.path.join(args.out, "attack_prompts.txt")
    with open(prompts, "w") as f:
        f.write("".join(line + "\n" for line in phrasings[:ATTACK_CASES["prompts"]]))
    pairs = os.path.join(args.out, "ringabell_pairs.tsv")
    with open(pairs, "w") as f:
        f.write("".join(line + "\n" for line in ringabell_pairs()))
    needs = {"unlearndiffatk": {"--target_images": concept_images(args)},  # drawn red circles, as for inversion
             "p4d-n": {"--original_model": p["sd_base"]}, "p4d-k": {"--original_model": p["sd_base"]},
             "ringabell": {"--pairs_file": pairs}}
    # The judge: the classifier, not CLIP. An attack's success is a verdict on one image, which is what the
    # classifier gives (the concept is there or not), while the demo's CLIP threshold is calibrated on mean scores
    # over prompts; and the classifier is a model of its own, while the toy CLIP's text tower is the attacked models'
    # text encoder, the one P4D and Ring-A-Bell search through. The published attacks judge with a classifier or
    # detector too.
    judge = {"--criterion": "classifier", "--model_path": p["classifier"], "--bc_threshold": th["bc_threshold"]}
    tasks = []
    for model, path, tags in attacked_models(p):
        searches = {**ATTACKS, **(BASELINES if model != "base" else {})}
        for attack, budget in searches.items():
            name = f"attack-{attack}-{model}"
            out = os.path.join(args.out, name)
            flags = {"--attack": attack, "--pretrained_model_name_or_path": path, "--prompts": prompts,
                     **needs.get(attack, {}), **budget, **judge, "--heldout_seeds": ATTACK_CASES["heldout_seeds"],
                     "--num_inference_steps": args.num_inference_steps, "--resolution": toy_world.RESOLUTION,
                     "--seed": args.seed, "--output_dir": out, "--quiet": None, "--tag": tags}
            # Rerun as is, an interrupted attack continues at its first unfinished prompt.
            tasks.append(Task(name, "tools/attack_prompts.py", out, flags, accelerate=False, resume_flags=()))
    return tasks


def seeds_plan(args, p, th, retention) -> list:
    """The sequential ESD-x and UCE runs on the related and the unrelated data and the control on the related data,
    once per fine-tuning seed: the demo's claims about the method (related data revives, unrelated does not, the
    control stays put) rest on these seeds, not on seed 0 alone."""
    plan = []
    seq = {**_sequential_flags(args, p, th, retention), "--save_model": "False"}
    for seed in args.run_seeds:
        for method in toy_world.UNLEARN_METHODS:
            for data in ("related", "unrelated"):
                plan.append(("finetuning_sequential.py", f"seq-{method}-{data}-seed{seed}", p["unlearned"][method],
                             data, {**seq, "--seed": seed, "--tag": [f"method={method}"]}))
        plan.append(("finetuning_sequential.py", f"seq-control-related-seed{seed}", p["sd_base"], "related",
                     {**seq, "--seed": seed, "--tag": CONTROL_TAGS}))
    return plan


def unlearn_seed_models(args, p, card: dict) -> dict:
    """{(method, unlearning seed): model directory}: each method of --unlearn_methods unlearned from the base model
    at each seed with the toy world's settings (tools/toy_world/build.py), in-process under the demo's pin; a model
    finished earlier on the same world is reused."""
    from tools.toy_world import build

    stamp, models = world_stamp(args.world), {}
    for method in args.unlearn_methods:
        for useed in args.unlearn_seeds:
            out = os.path.join(args.out, "unlearned", method, f"useed{useed}")
            if not done_earlier(out, stamp):
                t = time.time()
                shutil.rmtree(out, ignore_errors=True)
                build.run_unlearning(method, p["sd_base"], out, card["config"]["settings"], useed)
                mark_done(out, stamp)
                print(f"  tools/unlearn.py --method {method} --seed {useed}: {time.time() - t:.0f} s", flush=True)
            else:
                print(f"  {method} unlearning seed {useed}: done earlier, reused", flush=True)
            models[(method, useed)] = out
    return models


def unlearn_seeds_plan(args, p, th, retention, models: dict) -> list:
    """Every unlearned model of ``models`` fine-tuned sequentially on the related data at every fine-tuning seed,
    tagged with both seeds (tools/report.py then tells the two sources of the Revival Point's spread apart)."""
    seq = {**_sequential_flags(args, p, th, retention), "--save_model": "False"}
    return [("finetuning_sequential.py", f"seq-{method}-related-seed{seed}-useed{useed}", model, "related",
             {**seq, "--seed": seed, "--tag": [f"method={method}", f"unlearn_seed={useed}"]})
            for (method, useed), model in models.items() for seed in args.run_seeds]


def methods_models(args, p, card: dict) -> dict:
    """{method: unlearned model directory}: the world's own ESD-x and UCE, every other method of --methods made by
    tools/unlearn.py (two at a time, each a process of its own under the pin) with the world's seed for it."""
    from tools.toy_world import build

    models, tasks = {}, []
    for method in args.methods:
        if method in toy_world.UNLEARN_METHODS:
            models[method] = p["unlearned"][method]
            continue
        out = os.path.join(args.out, "unlearned", method)
        if method == "mace":  # its drawn images and exact masks (docs/unlearning.md: 16, seed 0)
            from tools.toy_world import masks

            masks.write_concept_set(build.mace_data_dir(out), images=16, seed=0)
        argv = build.unlearn_argv(method, p["sd_base"], out, card["config"]["settings"],
                                  build._seed(card["config"]["seed"], 60))
        tasks.append(Task(f"unlearn-{method}", "tools/unlearn.py", out, argv, accelerate=False, resumable=False))
        models[method] = out
    done, failed = run_tasks(tasks, args.world, args.out, args.jobs)
    return {m: d for m, d in models.items() if m in toy_world.UNLEARN_METHODS or d in done}, failed


def methods_scores(args, models: dict) -> dict:
    """{method: the world's erasure figures of its model} (tools/toy_world/score.py's protocol, the card's seeds),
    cached beside each run under the world's stamp."""
    from tools.toy_world import score

    stamp, out = world_stamp(args.world), {}
    for method, model in models.items():
        path = os.path.join(args.out, "scores", f"{method}.json")
        cached = None
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
        if cached is None or cached.get("stamp") != stamp:
            cached = {"stamp": stamp, "figures": score.score(model, args.world)}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(cached, f, indent=1)
        out[method] = cached["figures"]
    return out


def methods_plan(args, p, th, retention, models: dict) -> list:
    """Every method's model fine-tuned sequentially on the related and the unrelated data, and the base model on
    the related data as the control (the demo's sequential settings, fine-tuning seed --seed)."""
    seq = {**_sequential_flags(args, p, th, retention), "--save_model": "False"}
    plan = [("finetuning_sequential.py", f"seq-{method}-{data}", model, data, {**seq, "--tag": [f"method={method}"]})
            for method, model in models.items() for data in ("related", "unrelated")]
    plan.append(("finetuning_sequential.py", "seq-control-related", p["sd_base"], "related",
                 {**seq, "--tag": CONTROL_TAGS}))
    return plan


METHODS_TABLE = "methods_table.md"


def methods_table(scores: dict, runs: list) -> tuple:
    """One row per method: its erasure figures (the world's card protocol), its Revival Point by CLIP and by the
    classifier on the related and the unrelated data, the change after the related curriculum beyond the control's,
    and retention (mean CLIP cosine of the retention prompts, before -> after the related curriculum)."""
    from tools import report

    loaded = [report.load_run(r) for r in runs]
    control = next((r for r in loaded if r["control"]), None)
    header = ["method", "target: classifier accuracy", "retained: CLIP top-1", "neighbours: CLIP top-1",
              "RP CLIP, related", "RP classifier, related", "RP CLIP, unrelated", "RP classifier, unrelated",
              "beyond control: CLIP", "beyond control: classifier", "retention, related"]
    rows = []
    for method, fig in scores.items():
        mine = {r["data"]: r for r in loaded if r["method"] == method and not r["control"]}
        row = [method, f"{fig['classifier_acc_target']:.3f}", f"{fig['clip_top1_retained']:.3f}",
               f"{fig['neighbours_mean_clip_top1']:.3f}"]
        for data in ("related", "unrelated"):
            for name in ("clip", "classifier"):
                r = mine.get(data)
                point = r["summary"]["revival_point"].get(name) if r else None
                row.append("-" if r is None else f"chunk {point['chunk']}" if point else "not reached")
        for name in ("clip", "classifier"):
            r = mine.get("related")
            a = report.score_path(r, name) if r else []
            c = report.score_path(control, name) if control else []
            row.append(f"{(a[-1][1] - a[0][1]) - (c[-1][1] - c[0][1]):+.3f}" if a and c else "-")
        ret = report.retention_path(mine["related"]) if "related" in mine else []
        row.append(f"{ret[0][1]:.3f} -> {ret[-1][1]:.3f}" if ret else "-")
        rows.append(row)
    return header, rows


def world_stamp(world: str) -> str:
    """What a finished run was made from: the toy world's card (its numbers and numeric environment, so a rebuilt
    or differently pinned world gives another stamp). DEMO_DONE holds it; a run is reused only when it matches."""
    import hashlib

    with open(os.path.join(world, "card.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def done_earlier(out: str, stamp: str) -> bool:
    """True when ``out`` finished on the same world; a run of another world (or an older demo) is cleared."""
    done = os.path.join(out, "DEMO_DONE")
    if os.path.isfile(done):
        with open(done) as f:
            if f.read().strip() == stamp:
                return True
        shutil.rmtree(out, ignore_errors=True)  # made from another world or pin state: its numbers do not belong
    return False


def mark_done(out: str, stamp: str) -> None:
    with open(os.path.join(out, "DEMO_DONE"), "w") as f:
        f.write(stamp + "\n")


class Task(NamedTuple):
    """One process of the demo: a script, its output directory and flags."""
    name: str
    script: str
    out: str
    flags: dict
    accelerate: bool = True  # through `accelerate launch`, as users run the fine-tuning scripts
    resumable: bool = True  # continues an interrupted demo (with resume_flags), else starts afresh
    resume_flags: tuple = (("--resume_from_checkpoint", "latest"),)  # the fine-tuning scripts'; an attack: none


def run_tasks(tasks: List[Task], world: str, log_dir: str, jobs: int) -> tuple:
    """Run the tasks, ``jobs`` at a time (longest planned first is the caller's order); a task finished earlier on
    the same world is reused. Returns the finished output directories in task order, and how many failed."""
    stamp = world_stamp(world)

    def one(task: Task):
        if done_earlier(task.out, stamp):  # finished by an earlier `make demo` on this world: reuse it
            print(f"  {task.name}: done earlier, reused", flush=True)
            return True
        flags = dict(task.flags) if isinstance(task.flags, dict) else list(task.flags)
        if task.resumable:
            flags.update(task.resume_flags)
        else:
            shutil.rmtree(task.out, ignore_errors=True)
        ok = launch(task.script, flags, os.path.join(log_dir, f"{task.name}.log"), accelerate=task.accelerate) == 0
        if ok:
            mark_done(task.out, stamp)
        return ok

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait: each run is its own process
        done = list(pool.map(one, tasks))
    return [t.out for t, ok in zip(tasks, done) if ok], done.count(False)


def main(args):
    t0 = time.time()
    pin = numerics.describe()
    print(f"numerics: {'pinned' if pin['pinned'] else 'NOT pinned (numbers differ from docs/demo.md and by machine)'}:"
          f" {pin['cpu_model']}, torch {pin['torch_cpu_capability']} kernels, {pin['torch_threads']} thread(s), "
          f"MKL_CBWR={pin['pin']['MKL_CBWR']}; every run's config.json records it", flush=True)
    # Phase 1: the world (cached on disk; a second run reuses it).
    phases = {}
    t = time.time()
    card = toy_world.build_toy_world(args.world, seed=args.seed, scale=args.scale)
    phases["world"] = time.time() - t
    p = toy_world.paths(args.world)
    th = calibrate(card)
    print(f"thresholds: CLIP {th['clip_threshold']} (base {th['base_clip']:.4f}, best unlearned "
          f"{th['best_unlearned_clip']:.4f}), classifier {th['bc_threshold']} (base "
          f"{th['base_classifier_acc']:.3f}, highest unlearned {th['highest_unlearned_classifier_acc']:.3f})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "thresholds.json"), "w") as f:
        json.dump(th, f, indent=2)
    retention = os.path.join(args.out, "retention_prompts.txt")
    with open(retention, "w") as f:
        f.write("".join(toy_world.caption(*c) + "\n" for c in toy_world.RETENTION))
    common = {"--train_data_dir": None, "--caption_column": "prompt", "--resolution": toy_world.RESOLUTION,
              "--center_crop": None, "--random_flip": None, "--learning_rate": "1e-4", "--train_batch_size": 10,
              "--curriculum": toy_world.CURRICULUM, "--validation_prompts": p["prompts_target"],
              "--num_inference_steps": args.num_inference_steps, "--seed": args.seed}
    # Phase 2: fine-tune the unlearned models, and the base model as the control; probe them by concept inversion.
    t = time.time()
    scores = None
    if args.methods:  # every method's model first, and its erasure figures
        print(f"unlearning: {', '.join(args.methods)} (the world's ESD-x and UCE reused)", flush=True)
        models, unlearn_failed = methods_models(args, p, card)
        scores = methods_scores(args, models)
        phases["unlearning"] = time.time() - t
        t = time.time()
        plan = methods_plan(args, p, th, retention, models)
    elif args.unlearn_seeds:  # the unlearned models of each unlearning seed first
        plan = unlearn_seeds_plan(args, p, th, retention, unlearn_seed_models(args, p, card))
    else:
        plan = seeds_plan(args, p, th, retention) if args.run_seeds else demo_plan(args, p, th, retention)
    tasks = [Task(name, script, os.path.join(args.out, name),
                  {**common, "--pretrained_model_name_or_path": model, "--train_data_dir": p[f"data_{data}"],
                   "--output_dir": os.path.join(args.out, name), **extra})
             for script, name, model, data, extra in plan]
    if not args.run_seeds and not args.methods:
        tasks += inversion_tasks(args, p, th)
    runs, failed = run_tasks(tasks, args.world, args.out, args.jobs)
    phases["runs"] = time.time() - t
    if args.methods:  # the methods table, then the report and the figures' check
        failed += unlearn_failed
        header, rows = methods_table(scores, [r for r in runs if os.path.basename(r).startswith("seq-")])
        from tools.report import to_markdown

        os.makedirs(os.path.join(args.out, "report"), exist_ok=True)
        with open(os.path.join(args.out, "report", METHODS_TABLE), "w") as f:
            f.write(to_markdown(header, rows))
        print("the methods side by side (erasure: the world's card protocol; RP: Revival Point):")
        print(to_markdown(header, rows))
        return report_and_finish(args, card, runs, failed, t0, phases, f"demo of methods {', '.join(args.methods)}")
    if args.run_seeds:  # the seeds' table and plots only
        what = f"demo over seeds {args.run_seeds}" + (
            f" and unlearning seeds {args.unlearn_seeds}" if args.unlearn_seeds else "")
        return report_and_finish(args, card, runs, failed, t0, phases, what)
    # Phase 3: the prompt attacks on the unlearned models and the base model (columns of the probes table).
    t = time.time()
    attacks = attack_tasks(args, p, th)
    print(f"prompt attacks: {len(attacks)} runs ({', '.join(ATTACKS)} on "
          f"{', '.join(m for m, _, _ in attacked_models(p))}; the baselines {', '.join(BASELINES)} on the unlearned "
          f"models), {ATTACK_CASES['prompts']} prompts each", flush=True)
    attacked, attack_failed = run_tasks(attacks, args.world, args.out, args.jobs)
    runs, failed = runs + attacked, failed + attack_failed
    phases["attacks"] = time.time() - t
    # Phase 4: evaluate the base, unlearned and revived sequential models.
    t = time.time()
    seq_dirs = [r for r in runs if os.path.basename(r).startswith("seq-")
                and not os.path.basename(r).startswith("seq-control")]
    models = [p["sd_base"]] + [p["unlearned"][m] for m in toy_world.UNLEARN_METHODS if os.path.isdir(p["unlearned"][m])]
    eval_log = os.path.join(args.out, "eval.log")
    captions, reference = utility_inputs(args)
    rc = launch("eval_model.py", {",".join(models + seq_dirs): None, p["classifier"]: None,
                                  toy_world.caption(*toy_world.TARGET): None, "--prompt_file": p["prompts_target"],
                                  "--curr": None, "--images_per_prompt": 1, "--output_dir": os.path.join(args.out, "eval"),
                                  "--clip_model": p["clip"], "--num_inference_steps": args.num_inference_steps,
                                  "--resolution": toy_world.RESOLUTION, "--utility": captions,
                                  "--utility_reference": reference, "--fid_features": "clip",
                                  "--utility_base": p["sd_base"]}, eval_log)
    failed += rc != 0
    if rc == 0:
        print(format_table(read_jsonl(os.path.join(args.out, "eval", "results.jsonl"))))
    phases["evaluation"] = time.time() - t
    # Phase 5: the revival table and plots, and the check of every figure against the committed values.
    report_and_finish(args, card, runs, failed, t0, phases, "demo")


UTILITY_DRAWINGS = 2  # reference drawings per concept of the world (96 in all: above the tiny CLIP's 32 dimensions)
UTILITY_SEED = 90  # the reference drawings' stream of the world's seed


def utility_inputs(args) -> tuple:
    """The utility's caption set (each of the world's 48 concepts once, its first phrasing) and its real images
    (UTILITY_DRAWINGS fresh drawings of every concept, as the world's data are drawn), written once under --out."""
    from tools.toy_world.world import _seed, draw_concepts

    captions = os.path.join(args.out, "utility_captions.txt")
    reference = os.path.join(args.out, "utility_reference")
    with open(captions, "w") as f:
        f.write("".join(toy_world.caption(*c) + "\n" for c in toy_world.CONCEPTS))
    if not os.path.isdir(reference):
        images, _ = draw_concepts(toy_world.CONCEPTS, UTILITY_DRAWINGS, _seed(args.seed, UTILITY_SEED))
        tmp = reference + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for k, image in enumerate(images):
            image.save(os.path.join(tmp, f"{k:04d}.png"))
        os.replace(tmp, reference)
    return captions, reference


def report_and_finish(args, card: dict, runs, failed: int, t0: float, phases: dict, what: str) -> None:
    """tools/report.py over the finished runs, the figures' check, then the time of each phase; exit 1 when a run
    failed, 3 when a figure differs from the expected values."""
    t = time.time()
    utility = os.path.join(args.out, "eval")  # the utility of each evaluated model, when the demo measured it
    utility_flags = ["--utility", utility] if os.path.isdir(os.path.join(utility, "utility")) else []
    failed += subprocess.call([sys.executable, os.path.join(ROOT, "tools", "report.py"), *runs, "--out",
                               os.path.join(args.out, "report"), "--title", "Toy world", *utility_flags]) != 0
    phases["report"] = time.time() - t
    print(f"{what} finished in {time.time() - t0:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
          + f"; {args.jobs} run(s) at a time); outputs in {args.out}")
    if failed:
        print(f"demo: {failed} run(s) failed; see the .log files in {args.out}", file=sys.stderr)
        raise SystemExit(1)
    check_figures(args, card)


def check_figures(args, card: dict) -> None:
    """Compare every printed figure with tools/toy_world/expected_demo.json (or record them: --write_expected)."""
    section = expected_section(args)
    if section is None:
        print("figures not checked: " + ("unpinned, so other kernels and other bits than docs/demo.md's"
                                         if args.no_pin else "a number-changing flag is not its default"))
        return
    env = numerics.describe()
    found = demo_expected.demo_figures(args.out, card)
    if args.write_expected:
        demo_expected.write_section(found, section, env)
        print(f"recorded {len(found)} figures as the expected values of {section!r} in "
              f"{os.path.relpath(demo_expected.EXPECTED_FILE, ROOT)}")
        return
    try:
        n = demo_expected.check(found, section, env)
    except demo_expected.DemoCheckFailed as err:
        print(err, file=sys.stderr)
        raise SystemExit(3)
    print(f"figures checked: all {n} equal the expected values ({section})" if n else
          f"figures not checked: no expected values for {section!r} yet (tools/demo.py --write_expected)")


if __name__ == "__main__":
    _args = parse_args()
    if not _args.no_pin:  # the pin reaches every process the demo starts through the environment they inherit
        with exit_on_input_error("demo.py"):
            numerics.pin_process()  # torch is loaded already: re-runs this command under the pin
    main(_args)
