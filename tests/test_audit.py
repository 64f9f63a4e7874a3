"""tools/audit.py: the plan, its inputs, resuming, SLURM submission (fake sbatch) and the step job script.

The audit end to end on the toy world, killed halfway and resumed, is in test_toy_world.py (it reuses that
module's world).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import audit
from tools.flags_reference import load_parser
from tools.toy_world import write_audit_preset

ROOT = Path(__file__).resolve().parents[1]


def _models(tmp_path):
    """Stand-in model folders: the plan only needs them to look like diffusers pipelines."""
    for name in ("unlearned", "base"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "classifier").mkdir()
    (tmp_path / "clip").mkdir()
    return tmp_path


def _argv(tmp_path, *extra):
    return ["--model", str(tmp_path / "unlearned"), "--base_model", str(tmp_path / "base"), "--preset", "toy",
            "--classifier", str(tmp_path / "classifier"), "--clip_model", str(tmp_path / "clip"),
            "--out", str(tmp_path / "audit"), *extra]


def _plan(tmp_path, *extra):
    args = audit.parse_args(_argv(_models(tmp_path), *extra))
    return args, audit.plan_steps(args, audit.read_inputs(args.preset, args.out))


def test_every_step_parses_with_its_program_s_parser_and_comes_after_what_it_needs(tmp_path):
    args, steps = _plan(tmp_path)
    names = [s.name for s in steps]
    assert names == ["data-related", "data-unrelated", "concept-images", "finetune-related", "finetune-unrelated",
                     "control-related", "lora-related", "inversion", "attack-unlearndiffatk", "attack-p4d-n",
                     "attack-p4d-k", "attack-ringabell", "attack-none", "attack-random", "attack-seed_search",
                     "evaluate", "report"]
    for i, step in enumerate(steps):
        assert set(step.needs) <= set(names[:i]), step.name
        load_parser(step.program).parse_args(step.argv + step.resume)  # a renamed flag fails here
    by = {s.name: s for s in steps}
    flags = lambda s: dict(zip(s.argv[::2], s.argv[1::2]))  # noqa: E731 (only where every flag has a value)
    # The curricula come from the preset's concepts files: 10 concepts of 50 images.
    assert "--curriculum" in by["finetune-related"].argv
    curriculum = by["finetune-related"].argv[by["finetune-related"].argv.index("--curriculum") + 1]
    assert curriculum == ",".join(str(50 * k) for k in range(1, 11))
    # The control fine-tunes the base model and is tagged as one; the audited model is fine-tuned otherwise.
    control = by["control-related"].argv
    assert control[control.index("--pretrained_model_name_or_path") + 1] == str(tmp_path / "base")
    assert "role=control" in control
    assert by["finetune-related"].resume == ["--resume_from_checkpoint", "latest"]
    assert by["inversion"].fresh and not by["attack-p4d-n"].fresh  # an attack continues; inversion cannot
    # The paper's budget: the attacks' own (published) defaults, no cut flag passed.
    assert "--iterations" not in by["attack-p4d-n"].argv and "--generations" not in by["attack-ringabell"].argv
    # The baselines: each its own attack_prompts.py run at the attacks' judge, on the same cases.
    for b in ("none", "random", "seed_search"):
        argv = by[f"attack-{b}"].argv
        assert argv[argv.index("--attack") + 1] == b and "--tries" not in argv and "--seeds" not in argv
        for flag in ("--prompts", "--criterion", "--heldout_seeds", "--model_path"):
            assert argv[argv.index(flag) + 1] == by["attack-p4d-n"].argv[by["attack-p4d-n"].argv.index(flag) + 1]
    # Evaluation: the model, the base model and the revived runs' checkpoints.
    models = by["evaluate"].argv[0].split(",")
    assert models == [str(tmp_path / "unlearned"), str(tmp_path / "base"), args.out + "/finetune-related",
                      args.out + "/finetune-unrelated"]
    assert flags(by["data-related"])["--pretrained_model_name_or_path"] == str(tmp_path / "base")


def test_ringabell_pairs_replace_the_concept_by_other_concepts(tmp_path):
    path = audit.ringabell_pairs(str(tmp_path / "p.tsv"), "red circle", ["a Red Circle on grey", "no concept here"],
                                 ["blue square", "green cross"])
    assert Path(path).read_text().splitlines() == ["a Red Circle on grey\ta blue square on grey",
                                                   "a Red Circle on grey\ta green cross on grey"]
    assert audit.ringabell_pairs(str(tmp_path / "q.tsv"), "dog", ["a cat"], ["x"]) is None


def test_a_trained_classifier_and_the_budgets(tmp_path):
    args, steps = _plan(tmp_path, "--budget", "quick", "--threats", "attacks", "--attacks", "ringabell",
                        "--baselines", "random", "--num_processes", "2")
    # --classifier given: no classifier steps; only Ring-A-Bell and random tokens, at the quick budget's cut search.
    assert [s.name for s in steps] == ["data-related", "data-unrelated", "attack-ringabell", "attack-random",
                                       "evaluate", "report"]
    ring, rand = steps[2].argv, steps[3].argv
    assert ring[ring.index("--generations") + 1] == "120" and rand[rand.index("--tries") + 1] == "10"
    assert [s.name for s in _plan(tmp_path / "d", "--threats", "attacks", "--attacks", "p4d-n", "--baselines", "")[1]
            if s.name.startswith("attack-")] == ["attack-p4d-n"]
    args, steps = _plan(tmp_path / "c", "--curricula", "unrelated")
    assert [s.name for s in steps][:3] == ["data-unrelated", "concept-images", "finetune-unrelated"]
    assert not any(s.name in ("control-related", "lora-related") for s in steps)  # they need the related data
    args, steps = _plan(tmp_path / "b", "--num_processes", "2")
    finetune = next(s for s in steps if s.name == "finetune-related").argv
    assert finetune[finetune.index("--train_batch_size") + 1] == "5"  # 2 processes x 5: the protocol's batch of 10


def test_classifier_backbone_adds_its_data_and_training_and_styles_use_timm(tmp_path):
    _models(tmp_path)
    argv = [a for a in _argv(tmp_path) if a not in ("--classifier", str(tmp_path / "classifier"))]
    args = audit.parse_args(argv + ["--classifier_backbone", "vit-in21k"])
    steps = audit.plan_steps(args, audit.read_inputs("toy", args.out))
    names = [s.name for s in steps]
    assert names[:5] == ["data-related", "data-unrelated", "concept-images", "classifier-positive",
                         "classifier-negative"] and names[5] == "classifier"
    clf = steps[5]
    load_parser(clf.program).parse_args(clf.argv)
    assert clf.argv[clf.argv.index("--model_name_or_path") + 1] == "vit-in21k"
    seq = next(s for s in steps if s.name == "finetune-related")
    assert "classifier" in seq.needs and seq.argv[seq.argv.index("--model_path") + 1] == args.out + "/classifier"
    # A style: the timm route, whose classifier is a state-dict file that --model_path takes with --theme.
    style = tmp_path / "style"
    write_audit_preset(str(style))
    card = json.loads((style / "concept.json").read_text())
    (style / "concept.json").write_text(json.dumps({**card, "name": "red circle", "theme": "Toy style"}))
    args = audit.parse_args([*argv[:argv.index("--preset") + 1], str(style), *argv[argv.index("--preset") + 2:],
                             "--classifier_backbone", "in21k.safetensors"])
    steps = {s.name: s for s in audit.plan_steps(args, audit.read_inputs(str(style), args.out))}
    clf = steps["classifier"].argv
    assert clf[clf.index("--init_weights") + 1] == "in21k.safetensors" and "--timm_arch" in clf
    seq = steps["finetune-related"].argv
    assert seq[seq.index("--model_path") + 1] == args.out + "/classifier/classifier.safetensors"
    assert seq[seq.index("--theme") + 1] == "Toy style"


def test_missing_inputs_are_named_together_before_anything_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "audit.py"), "--model", str(tmp_path / "nope"),
                        "--base_model", str(tmp_path / "nope2"), "--preset", "toy", "--clip_model",
                        str(tmp_path / "noclip"), "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "audit.py: error: the audit cannot start; it needs:" in lines[0]
    for part in ("--model", "--base_model", "a concept classifier", "--clip_model"):
        assert part in lines[0], part
    assert not (tmp_path / "a" / "data").exists()  # nothing ran
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "audit.py"), *_argv(_models(tmp_path / "m"),
                        "--threats", "finetune,nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--threats nope: unknown" in r.stderr


FAKE_STEP = """import os, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "calls"), "a") as f:
    f.write(" ".join(sys.argv[2:]) + "\\n")
sys.exit(int(os.environ.get("FAIL_" + os.path.basename(out), "0")))
"""


def _fake_steps(tmp_path):
    prog = tmp_path / "fake_step.py"
    prog.write_text(FAKE_STEP)
    out = tmp_path / "audit"
    return [audit.Step(n, str(prog), [str(out / n), "--x", "1"], str(out / n), needs=needs,
                       resume=["--resume_from_checkpoint", "latest"], fresh=fresh)
            for n, needs, fresh in (("a", [], False), ("b", ["a"], False), ("c", ["b"], True))]


def test_a_rerun_skips_finished_steps_and_continues_the_interrupted_one(tmp_path, monkeypatch, capsys):
    steps = _fake_steps(tmp_path)
    out = str(tmp_path / "audit")
    monkeypatch.setenv("FAIL_b", "1")
    assert audit.run_local(steps, out, 1) == 1  # b fails: c never starts
    assert not os.path.exists(os.path.join(out, "c"))
    monkeypatch.setenv("FAIL_b", "0")
    monkeypatch.setenv("FAIL_c", "1")
    assert audit.run_local(steps, out, 1) == 1  # b finishes, c fails leaving a partial folder
    monkeypatch.setenv("FAIL_c", "0")
    assert audit.run_local(steps, out, 1) == 0
    printed = capsys.readouterr().out
    assert "a: done earlier, skipped" in printed and "b: continuing" in printed
    assert Path(out, "a", "calls").read_text() == "--x 1\n"  # a ran once
    # b: the first run, then the rerun with the resume flags (its folder held a partial run).
    assert Path(out, "b", "calls").read_text() == "--x 1\n--x 1 --resume_from_checkpoint latest\n"
    # c cannot continue (fresh): its partial folder was cleared and it ran again from the start, no resume flags.
    assert Path(out, "c", "calls").read_text() == "--x 1\n"
    # Another command for a finished step (here, other flags) runs it again.
    steps[0].argv[-1] = "2"
    assert audit.run_local(steps, out, 1) == 0
    # (its folder is not empty: the flags go with it, and the tool decides whether the old state fits the new flags)
    assert Path(out, "a", "calls").read_text() == "--x 1\n--x 2 --resume_from_checkpoint latest\n"
    assert Path(out, "b", "calls").read_text().count("\n") == 2  # unchanged command: still done


def test_slurm_submits_each_unfinished_step_after_the_jobs_it_needs(tmp_path):
    steps = _fake_steps(tmp_path)
    audit.mark_done(steps[0])  # a finished earlier: not submitted, and b does not wait for it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {log}\nn=$(wc -l < {log})\necho "$((100 + n))"\n')
    (bin_dir / "sbatch").chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old}"
    try:
        lines = audit.submit_slurm(steps, str(tmp_path / "audit"), "--partition gpu", dry_run=False)
    finally:
        os.environ["PATH"] = old
    calls = log.read_text().splitlines()
    template = str(ROOT / "slurm" / "audit_step.sbatch")
    assert calls == [f"--parsable --job-name=audit-b --partition gpu {template} {tmp_path / 'audit'} b",
                     f"--parsable --job-name=audit-c --partition gpu --dependency=afterok:101 {template} "
                     f"{tmp_path / 'audit'} c"]
    assert len(lines) == 2


def test_the_step_job_runs_the_plan_s_command_and_marks_it_done(tmp_path):
    steps = _fake_steps(tmp_path)
    out = tmp_path / "audit"
    audit.write_plan(str(out), steps, 1)
    env = dict(os.environ, PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="7")
    run = lambda: subprocess.run(["bash", str(ROOT / "slurm" / "audit_step.sbatch"), str(out), "b"],  # noqa: E731
                                 capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert Path(out, "b", "calls").read_text() == "--x 1\n"
    assert audit.is_done(steps[1]) and not audit.is_done(steps[0])
    r = run()  # a requeued or repeated job of a finished step does nothing
    assert r.returncode == 0 and "done earlier" in r.stdout
    assert Path(out, "b", "calls").read_text() == "--x 1\n"
    r = subprocess.run(["bash", str(ROOT / "slurm" / "audit_step.sbatch"), str(out), "zz"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "--step zz: not in" in r.stderr


@pytest.mark.parametrize("concept", ["golf ball", "Van Gogh", "nudity"])
def test_the_paper_presets_plan_commands_their_programs_accept(tmp_path, concept, monkeypatch):
    """An object, a style (its classifier a state-dict file, --theme the style) and nudity (NudeNet: no classifier
    to give; the evaluation's classifier argument 'none'). Offline, hub ids must be in the cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    _models(tmp_path)
    (tmp_path / "style.safetensors").write_bytes(b"")
    argv = ["--model", str(tmp_path / "unlearned"), "--base_model", "CompVis/stable-diffusion-v1-4",
            "--preset", concept, "--clip_model", "openai/clip-vit-base-patch32", "--out", str(tmp_path / "a")]
    if concept == "golf ball":
        argv += ["--classifier", str(tmp_path / "classifier")]
    elif concept == "Van Gogh":
        argv += ["--classifier", str(tmp_path / "style.safetensors")]
    args = audit.parse_args(argv)
    inputs = audit.read_inputs(args.preset, args.out)
    missing = audit.missing_inputs(args, inputs)
    assert [m.split(":")[0] for m in missing] == ["--base_model CompVis/stable-diffusion-v1-4",
                                                  "--clip_model openai/clip-vit-base-patch32"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert audit.missing_inputs(args, inputs) == []
    steps = audit.plan_steps(args, inputs)
    for step in steps:
        load_parser(step.program).parse_args(step.argv + step.resume)
    by = {s.name: s for s in steps}
    seq = by["finetune-related"].argv
    theme = seq[seq.index("--theme") + 1]
    assert theme == {"golf ball": "", "Van Gogh": "Van Gogh", "nudity": "Nudity"}[concept]
    assert ("--model_path" in seq) == (concept != "nudity")
    assert by["evaluate"].argv[1] == ("none" if concept == "nudity" else argv[argv.index("--classifier") + 1])
    inv = by["inversion"].argv
    assert inv[inv.index("--initializer_token") + 1] == {"golf ball": "ball", "Van Gogh": "painting",
                                                          "nudity": "person"}[concept]


def test_a_step_needs_the_launcher_only_on_several_processes(tmp_path):
    args, steps = _plan(tmp_path, "--threats", "finetune", "--curricula", "related")
    finetune = next(s for s in steps if s.name == "finetune-related")
    one, two = audit.command(finetune, 1, rerun=False), audit.command(finetune, 2, rerun=True)
    assert one[:2] == [sys.executable, str(ROOT / "finetuning_sequential.py")]
    assert two[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--multi_gpu" in two
    assert two[-2:] == ["--resume_from_checkpoint", "latest"]
