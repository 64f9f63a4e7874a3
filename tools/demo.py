#!/usr/bin/env python
"""The built-in demo: concept revival in a toy world, on a CPU (`make demo`).

Phases: build (or reuse) the toy world; calibrate the thresholds; fine-tune the
unlearned models (ESD-x, UCE) with the four scripts through `accelerate
launch`; evaluate; print the revival table and write plots (tools/report.py).

Every sequential run also scores retention prompts (the target's neighbours
and unrelated concepts, toy_world.RETENTION), and a control run fine-tunes the
base model (never unlearned) on the related curriculum (tagged role=control:
tools/report.py pairs it with the unlearned runs).

`--run_seeds 0,1,2` runs instead only the sequential ESD-x, UCE and control runs
on the related data, once per fine-tuning seed (same world), and reports them
with bootstrap intervals over the seeds.

Numbers: the demo runs under the pinned numeric environment of
common/numerics.py (AVX2 kernels, MKL's SSE2 branch, one thread per
process), which every process it starts inherits, so any x86-64 AVX2 machine
computes the same bits. `--no_pin` (`make demo PIN=0`) lets torch choose
kernels and threads: faster on a big machine, other numbers.

Threshold rule (documented in the README): the paper's CLIP threshold (0.31)
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tools import toy_world  # noqa: E402
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
    p.add_argument("--clip_epoch", type=int, default=5, help="epoch budget of the individual runs")
    p.add_argument("--num_train_epochs", type=int, default=8, help="epochs per chunk of the sequential runs (paper 8)")
    p.add_argument("--num_inference_steps", type=int, default=10)
    p.add_argument("--no_pin", action="store_true",
                   help="run without the pinned numeric environment (common/numerics.py): torch's own kernels and "
                        "threads, faster on a big machine, but the numbers differ from the README's (make demo PIN=0)")
    p.add_argument("--run_seeds", default=None,
                   help="e.g. 0,1,2: only the sequential ESD-x/UCE/control runs on the related data, once per "
                        "fine-tuning seed, and the table over seeds (default --out: demo_runs_seeds/)")
    args = p.parse_args(argv)
    if args.run_seeds is not None:
        try:
            args.run_seeds = [int(x) for x in args.run_seeds.split(",") if x.strip()]
        except ValueError:
            p.error(f"--run_seeds {args.run_seeds!r}: expected comma-separated integers, e.g. 0,1,2")
        if not args.run_seeds:
            p.error("--run_seeds: give at least one seed")
    args.out = args.out or os.path.join(ROOT, "demo_runs_seeds" if args.run_seeds else "demo_runs")
    return args


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


def launch(script: str, flags: dict, log_path: str, accelerate: bool = True) -> int:
    """Run one script through `accelerate launch` (1 CPU process), or a tool with plain python; its output goes to
    log_path."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"] if accelerate else [sys.executable]
    cmd.append(os.path.join(ROOT, script))
    for k, v in flags.items():  # a list value repeats the flag (--tag)
        cmd += [k if x is None else f"{k}={x}" for x in (v if isinstance(v, list) else [v])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", PYTHONPATH=ROOT)
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
        plan.append(("finetuning_individual_CLIP.py", f"clip-{method}-related", model, "related",
                     {"--clip_threshold": th["clip_threshold"], "--clip_model": p["clip"],
                      "--clip_epoch": args.clip_epoch, "--validation_epochs": 1, "--save_model": "False"}))
    if plan:
        method = plan[0][2]
        plan.append(("finetuning_individual_Classifier.py", f"clf-{os.path.basename(method)}-related", method,
                     "related", {"--model_path": p["classifier"], "--bc_threshold": th["bc_threshold"],
                                 "--clip_epoch": args.clip_epoch, "--validation_epochs": 1, "--save_model": "False"}))
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


def concept_inversion(args, p, th) -> tuple:
    """tools/concept_inversion.py on each unlearned model: 20 drawn images of the target, the target's validation
    prompts with its name replaced by the placeholder; returns the finished output directories and the failures."""
    from tools import tiny

    images = os.path.join(args.out, "concept_images")
    if not os.path.isdir(images):
        tiny.shapes_dataset(images, [toy_world.TARGET], per_concept=INVERSION["images"], size=toy_world.RESOLUTION,
                            seed=args.seed + 1)
    name = " ".join(toy_world.TARGET)  # "red circle"
    prompts = os.path.join(args.out, "inversion_prompts.txt")
    with open(p["prompts_target"]) as src, open(prompts, "w") as dst:
        dst.write("".join(line.replace(name, "<concept>") for line in src if line.strip()))
    outs, failed = [], 0
    for method in toy_world.UNLEARN_METHODS:
        out = os.path.join(args.out, f"inversion-{method}")
        if done_earlier(out, world_stamp(args.world)):
            print(f"  inversion-{method}: done earlier, reused")
            outs.append(out)
            continue
        flags = {"--pretrained_model_name_or_path": p["unlearned"][method], "--train_data_dir": images,
                 "--validation_prompts": prompts, "--initializer_token": INVERSION["initializer"],
                 "--concept_name": name, "--learning_rate": INVERSION["learning_rate"],
                 "--train_batch_size": INVERSION["batch"], "--max_train_steps": INVERSION["steps"],
                 "--validation_steps": INVERSION["every"], "--resolution": toy_world.RESOLUTION, "--center_crop": None,
                 "--num_inference_steps": args.num_inference_steps, "--seed": args.seed, "--clip_model": p["clip"],
                 "--clip_threshold": th["clip_threshold"], "--model_path": p["classifier"],
                 "--bc_threshold": th["bc_threshold"], "--output_dir": out, "--quiet": None,
                 "--tag": [f"method={method}", f"concept={toy_world.caption(*toy_world.TARGET)}"]}
        shutil.rmtree(out, ignore_errors=True)  # an interrupted probe starts afresh (it has no checkpoints)
        if launch("tools/concept_inversion.py", flags, os.path.join(args.out, f"inversion-{method}.log"),
                  accelerate=False) == 0:
            mark_done(out, world_stamp(args.world))
            outs.append(out)
        else:
            failed += 1
    return outs, failed


def seeds_plan(args, p, th, retention) -> list:
    """The sequential ESD-x, UCE and control runs on the related data, once per fine-tuning seed."""
    plan = []
    seq = {**_sequential_flags(args, p, th, retention), "--save_model": "False"}
    for seed in args.run_seeds:
        for method in toy_world.UNLEARN_METHODS:
            plan.append(("finetuning_sequential.py", f"seq-{method}-related-seed{seed}", p["unlearned"][method],
                         "related", {**seq, "--seed": seed, "--tag": [f"method={method}"]}))
        plan.append(("finetuning_sequential.py", f"seq-control-related-seed{seed}", p["sd_base"], "related",
                     {**seq, "--seed": seed, "--tag": CONTROL_TAGS}))
    return plan


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


def main(args):
    t0 = time.time()
    pin = numerics.describe()
    print(f"numerics: {'pinned' if pin['pinned'] else 'NOT pinned (numbers differ from the README and by machine)'}:"
          f" {pin['cpu_model']}, torch {pin['torch_cpu_capability']} kernels, {pin['torch_threads']} thread(s), "
          f"MKL_CBWR={pin['pin']['MKL_CBWR']}; every run's config.json records it", flush=True)
    # Phase 1: the world (cached on disk; a second run reuses it).
    card = toy_world.build_toy_world(args.world, seed=args.seed, scale=args.scale)
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
    # Phase 2: fine-tune the unlearned models, and the base model as the control.
    runs = []
    failed = 0
    plan = seeds_plan(args, p, th, retention) if args.run_seeds else demo_plan(args, p, th, retention)
    for script, name, model, data, extra in plan:
        out = os.path.join(args.out, name)
        flags = {**common, "--pretrained_model_name_or_path": model, "--train_data_dir": p[f"data_{data}"],
                 "--output_dir": out, **extra}
        if done_earlier(out, world_stamp(args.world)):  # finished by an earlier `make demo` on this world: reuse it
            print(f"  {name}: done earlier, reused")
            runs.append(out)
            continue
        flags["--resume_from_checkpoint"] = "latest"  # continue an interrupted demo (or start afresh)
        if launch(script, flags, os.path.join(args.out, f"{name}.log")) == 0:
            mark_done(out, world_stamp(args.world))
            runs.append(out)
        else:
            failed += 1
    if args.run_seeds:  # the seeds' table and plots only
        return report_and_finish(args, runs, failed, t0, f"demo over seeds {args.run_seeds}")
    # Phase 2b: the concept-inversion probe of each unlearned model (one learned token, the model frozen).
    probes, probe_failures = concept_inversion(args, p, th)
    runs += probes
    failed += probe_failures
    # Phase 3: evaluate the base, unlearned and revived sequential models.
    seq_dirs = [r for r in runs if os.path.basename(r).startswith("seq-")
                and not os.path.basename(r).startswith("seq-control")]
    models = [p["sd_base"]] + [p["unlearned"][m] for m in toy_world.UNLEARN_METHODS if os.path.isdir(p["unlearned"][m])]
    eval_log = os.path.join(args.out, "eval.log")
    rc = launch("eval_model.py", {",".join(models + seq_dirs): None, p["classifier"]: None,
                                  toy_world.caption(*toy_world.TARGET): None, "--prompt_file": p["prompts_target"],
                                  "--curr": None, "--images_per_prompt": 2, "--output_dir": os.path.join(args.out, "eval"),
                                  "--clip_model": p["clip"], "--num_inference_steps": args.num_inference_steps,
                                  "--resolution": toy_world.RESOLUTION}, eval_log)
    failed += rc != 0
    if rc == 0:
        print(format_table(read_jsonl(os.path.join(args.out, "eval", "results.jsonl"))))
    # Phase 4: the revival table and plots.
    report_and_finish(args, runs, failed, t0, "demo")


def report_and_finish(args, runs, failed: int, t0: float, what: str) -> None:
    """tools/report.py over the finished runs, then the time taken; exit 1 when anything failed."""
    failed += subprocess.call([sys.executable, os.path.join(ROOT, "tools", "report.py"), *runs, "--out",
                               os.path.join(args.out, "report"), "--title", "Toy world"]) != 0
    print(f"{what} finished in {time.time() - t0:.0f} s; outputs in {args.out}")
    if failed:
        print(f"demo: {failed} run(s) failed; see the .log files in {args.out}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    _args = parse_args()
    if not _args.no_pin:  # the pin reaches every process the demo starts through the environment they inherit
        with exit_on_input_error("demo.py"):
            numerics.pin_process()  # torch is loaded already: re-runs this command under the pin
    main(_args)
