"""The cost before you submit (tools/cost.py, tools/grid.py estimate): the protocol's counts, recomputed by hand, the
hours from the figures' rates, the disk from the saving rules, the assumed figures from their FLOP counts, and the
documented example. Fast: no model is built, no program launched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from tools import cost, grid as grid_tool

EXAMPLE = str(ROOT / "slurm" / "example_grid.csv")
A100 = json.loads((ROOT / "configs" / "gpu_figures" / "a100.json").read_text())
UNET, TEXT, VAE = 3.43808385600, 0.49224192, 0.334615452  # GB: SD-1.x parameter counts x 4 bytes / 1e9


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Every test runs in an empty directory: the relative prompt files of the flags are not there."""
    monkeypatch.chdir(tmp_path)


def estimate(capsys, *argv) -> str:
    """``python tools/grid.py estimate ...``'s output, in this process."""
    grid_tool.main(grid_tool.parse_args(["estimate", *argv]))
    return capsys.readouterr().out


def base_flags(*extra) -> list:
    return ["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--validation_prompts=prompts.txt",
            "--curriculum=50,100,150,200,250,300,350,400,450,500", "--center_crop", *extra]


def sequential_seconds(fig: dict, prompts: int = 20) -> dict:
    """One run of slurm/example_grid.csv, by hand: 10 chunks of 50 rows (cumulative boundaries 50,...,500), 8
    epochs each, --gradient_checkpointing (the figures have none: 1 more forward, 2.41 + 0.803 TFLOP a sample),
    --random_flip (the cache encodes both orientations), --use_ema, --save_model's default True, no
    --curriculum_checkpoints (only the final pipeline), 400 updates (< --checkpointing_steps 500: no checkpoint)."""
    samples = 10 * 50 * 8
    assert samples == 4000
    validations = 1 + 10  # before training, then after every chunk
    return {
        "samples": samples, "images": validations * prompts,
        "train": samples * (2.41 + 2.41 / 3) / 2.41 / fig["cached_samples_per_s"],
        "cache": 500 * 2 * (1.117 / 2.41) / fig["cached_samples_per_s"],
        "validation": validations * prompts / fig["validation_batched_images_per_s"],  # 20 steps, as the figures
        "startup": 120.0,
        "saves": (2 * UNET + TEXT + VAE) / 0.5,  # the final pipeline: EMA UNet, trained UNet, text encoder, VAE
    }


def test_the_example_grid_s_estimate_is_the_hand_computed_one(capsys, tmp_path):
    # The grid's prompt files are not here: the paper's 20 prompts, said so.
    out = estimate(capsys, EXAMPLE)
    lines = out.splitlines()
    assert lines[0].startswith("estimate from assumed figures: NVIDIA A100 (assumed), fp16, 2026-12-05 "
                               "(configs/gpu_figures/a100.json); estimates until a GPU measures them")
    hand = sequential_seconds(A100)
    hours = sum(v for k, v in hand.items() if k not in ("samples", "images")) / 3600
    assert 0.09 < hours < 0.11  # 366 s: training 137, cache 12, validation 81, start-up 120, saves 15
    disk = 2 * UNET + TEXT + VAE
    rows = [line for line in lines if "finetuning_sequential/" in line]
    assert len(rows) == 8
    for row in rows:
        assert row.split()[2:] == ["4,000", "220", f"{hours:.3f}", f"{hours:.3f}", f"{disk:.1f}", f"{disk:.1f}"]
    (total,) = [line for line in lines if "total (8 runs)" in line]
    assert total.split()[3:] == ["32,000", "1,760", f"{8 * hours:.3f}", f"{8 * hours:.3f}", f"{8 * disk:.1f}",
                                 f"{8 * disk:.1f}"]
    assert "note (runs 0, 1, 4, 5): --validation_prompts prompts/golf_ball.txt: not found here, 20 prompts " \
           "assumed (the paper's)" in lines
    # The JSON carries the same numbers unrounded, part by part.
    data = json.loads(estimate(capsys, EXAMPLE, "--json"))
    run = data["runs"][0]
    assert run["counts"]["train_samples"] == {"low": 4000, "high": 4000}
    assert run["counts"]["validation_image_steps"]["high"] == 220 * 20
    assert run["counts"]["cache_encoded_images"] == 1000
    for key, part in (("train_s", "train"), ("validation_s", "validation"), ("write_s", "saves")):
        assert run[key]["high"] == pytest.approx(hand[part], rel=1e-9), key
    assert run["cache_s"] == pytest.approx(hand["cache"], rel=1e-9)
    assert run["gpu_hours"]["high"] == pytest.approx(hours, rel=1e-9)
    assert data["totals"]["gpu_hours"]["low"] == pytest.approx(8 * hours, rel=1e-9)
    # A prompt file that is there is read: 3 prompts, 33 validation images.
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "church.txt").write_text("a church\n\na photo of a church\nchurch\n")
    data = json.loads(estimate(capsys, EXAMPLE, "--json"))
    assert [r["counts"]["validation_images"]["high"] for r in data["runs"]] == [220, 220, 33, 33] * 2


def test_measured_figures_change_the_hours_in_proportion(capsys, tmp_path):
    """Twice the assumed rates halve training, cache and validation; start-up and saves stay."""
    measured = {k: v for k, v in A100.items() if k not in ("source", "assumed")}
    for key in ("cached_samples_per_s", "uncached_samples_per_s", "validation_batched_images_per_s"):
        measured[key] *= 2
    measured.update(gpu="NVIDIA H100 80GB HBM3", date="2027-01-02", model="sd14-shapes (random)")
    path = tmp_path / "h100-measured.json"
    path.write_text(json.dumps(measured))
    out = estimate(capsys, EXAMPLE, "--figures", str(path))
    assert out.splitlines()[0].startswith("estimate from measured figures: NVIDIA H100 80GB HBM3, fp16, 2027-01-02")
    hand = sequential_seconds(A100)
    variable, fixed = hand["train"] + hand["cache"] + hand["validation"], hand["startup"] + hand["saves"]
    data = json.loads(estimate(capsys, EXAMPLE, "--figures", str(path), "--json"))
    assert data["figures"]["measured"] is True
    assert data["runs"][0]["gpu_hours"]["high"] == pytest.approx((variable / 2 + fixed) / 3600, rel=1e-9)
    # Figures taken with --gradient_checkpointing time such a run as measured: no FLOP rescaling.
    path.write_text(json.dumps({**measured, "gradient_checkpointing": True}))
    data = json.loads(estimate(capsys, EXAMPLE, "--figures", str(path), "--json"))
    assert data["runs"][0]["train_s"]["high"] == pytest.approx(4000 / measured["cached_samples_per_s"], rel=1e-9)


def test_two_gpus_per_run_split_the_work_and_pay_start_up_twice():
    fig = cost.load_figures(cost.figures_path("h100"))
    runs = grid_tool.grid.read_grid(EXAMPLE, "runs")[:1]
    (one,), _ = cost.estimate_runs(runs, fig, 1)
    (two,), _ = cost.estimate_runs(runs, fig, 2)
    assert two.counts.train_samples == one.counts.train_samples  # the grid's global batch whatever the GPUs
    assert two.train_s.high == pytest.approx(one.train_s.high / 2)
    assert two.validation_s.high == pytest.approx(one.validation_s.high / 2)  # 10 of the 20 prompts each
    assert two.cache_s == pytest.approx(one.cache_s)  # every process encodes the whole chunk
    wall = two.train_s.high + two.validation_s.high + two.cache_s + two.startup_s + two.write_s.high
    assert two.gpu_hours.high == pytest.approx(2 * wall / 3600)


def test_individual_epochs_bounds_and_validations():
    # The individual loop (common/protocol.py): stop after the first epoch e > clip_epoch, so epochs 0..clip_epoch+1.
    assert cost.individual_epoch_cap(89, 2, compat_reference=False) == 91
    assert cost.individual_epoch_cap(88, 2, compat_reference=False) == 90
    assert cost.individual_epoch_cap(89, 1, compat_reference=False) == 91
    # The reference checks the cap on validated epochs only: an even cap trains one more epoch.
    assert cost.individual_epoch_cap(88, 2, compat_reference=True) == 91
    assert cost.individual_epoch_cap(89, 2, compat_reference=True) == 91
    assert cost.individual_epoch_cap(0, 2, compat_reference=True) == 3
    assert cost.validations_in(91, 2) == 46  # epochs 0, 2, ..., 90
    assert cost.validations_in(91, 1) == 91
    assert cost.validations_in(91, 3) == 31  # 0, 3, ..., 90
    assert cost.validations_in(1, 2) == 1


def test_individual_counts_by_hand():
    fig = cost.load_figures(cost.figures_path("a100"))
    # CLIP script: validation every 2nd epoch; --start_CL 3: chunks 3..9, 7 chunks of 50 rows.
    c = cost.estimate_run("finetuning_individual_CLIP.py", base_flags("--start_CL", "3"), fig).counts
    assert c.chunks == [3, 4, 5, 6, 7, 8, 9] and c.chunk_sizes == [50] * 7
    assert c.train_samples == cost.Range(7 * 50 * 1, 7 * 50 * 91)  # revived at epoch 0 / the cap, 91 epochs
    assert c.validations == cost.Range(7, 7 * 46)
    assert c.validation_images == cost.Range(7 * 20, 7 * 46 * 20)  # prompts.txt is not here: 20 assumed
    assert c.updates == cost.Range(7 * 5, 7 * 5 * 91)
    assert c.checkpoints_written == cost.Range(0, 6)  # 3185 updates at most, one every 500
    # --validation_epochs 3, --clip_epoch 9: 11 epochs (0..10), validated at 0, 3, 6, 9.
    c = cost.estimate_run("finetuning_individual_CLIP.py",
                          base_flags("--validation_epochs", "3", "--clip_epoch", "9", "--end_CL", "2"), fig).counts
    assert c.train_samples == cost.Range(100, 2 * 50 * 11) and c.validations == cost.Range(2, 2 * 4)
    # Classifier script: every epoch; --no_early_stop trains to the cap whatever the scores.
    c = cost.estimate_run("finetuning_individual_Classifier.py", base_flags("--model_path=c"), fig).counts
    assert c.validations == cost.Range(10, 10 * 91)
    c = cost.estimate_run("finetuning_individual_Classifier.py", base_flags("--model_path=c", "--no_early_stop"),
                          fig).counts
    assert c.train_samples == cost.Range(45500, 45500) and c.validations == cost.Range(910, 910)


def test_the_reference_loop_s_samples_by_hand():
    # --compat reference: epoch 0 the chunk's 5 full batches, then one micro-batch (10 rows) per epoch.
    assert cost.chunk_training(50, 91, 10, 1, 1, compat_reference=True) == (50 + 90 * 10, 5 + 90, 0)
    # Accumulating 2: 3 updates in epoch 0 (2 + 2 + the last micro-batch), then one every 2nd epoch.
    assert cost.chunk_training(50, 91, 10, 2, 1, compat_reference=True) == (950, 3 + 45, 0)
    # The short last batch is dropped: 55 rows train 50 in epoch 0.
    assert cost.chunk_training(55, 1, 10, 1, 1, compat_reference=True)[0] == 50
    assert cost.chunk_training(55, 3, 10, 1, 1) == (165, 18, 0)  # ours: every row, 6 updates an epoch
    fig = cost.load_figures(cost.figures_path("a100"))
    c = cost.estimate_run("finetuning_individual_CLIP.py", base_flags("--compat", "reference", "--clip_epoch", "88"),
                          fig).counts
    assert c.epochs.high == 10 * 91 and c.train_samples.high == 10 * 950


def test_sequential_counts_by_hand():
    fig = cost.load_figures(cost.figures_path("a100"))
    flags = base_flags("--chunk_epochs", "8,8,4,4,2,2,1,1,1,1", "--curriculum_checkpoints", "4,7", "--use_ema")
    e = cost.estimate_run("finetuning_sequential.py", flags, fig)
    c = e.counts
    assert c.train_samples == cost.Range(50 * 32, 50 * 32) and c.validations == cost.Range(11, 11)
    assert c.pipelines == cost.Range(3, 3)  # curriculum-4, curriculum-7, the final model
    assert e.disk_final_gb.high == pytest.approx(3 * (2 * UNET + TEXT + VAE))
    # --stop_at_revival: at the earliest, every criterion is met after the first chunk.
    c = cost.estimate_run("finetuning_sequential.py", flags + ["--stop_at_revival"], fig).counts
    assert c.train_samples == cost.Range(50 * 8, 50 * 32) and c.validations == cost.Range(2, 11)
    assert c.pipelines == cost.Range(1, 3)


def test_disk_follows_the_saving_rules():
    fig = cost.load_figures(cost.figures_path("a100"))
    flags = base_flags("--use_ema", "--checkpointing_steps", "100")
    e = cost.estimate_run("finetuning_individual_CLIP.py", flags, fig)
    # The README's 7.7 GB a chunk and common/cli.py's "14 GB with --use_ema" checkpoint.
    assert e.pipeline_gb == pytest.approx(2 * UNET + TEXT + VAE) and round(e.pipeline_gb, 1) == 7.7
    assert e.checkpoint_gb == pytest.approx(4 * UNET) and round(e.checkpoint_gb) == 14
    assert e.counts.checkpoints_written == cost.Range(0, 45)  # 4550 updates at most
    # Two checkpoints kept (--checkpoints_total_limit's default); a third is written before the oldest goes.
    assert e.disk_final_gb.high == pytest.approx(10 * e.pipeline_gb + 2 * e.checkpoint_gb)
    assert e.disk_peak_gb.high == pytest.approx(10 * e.pipeline_gb + 3 * e.checkpoint_gb)
    # No pipeline, no EMA: the two newest of 9 checkpoints of 10.3 GB; without checkpoints, nothing.
    bare = cost.estimate_run("finetuning_individual_CLIP.py", base_flags("--save_model", "False"), fig)
    assert bare.checkpoint_gb == pytest.approx(3 * UNET) and bare.disk_final_gb.high == pytest.approx(6 * UNET)
    bare = cost.estimate_run("finetuning_individual_CLIP.py",
                             base_flags("--save_model", "False", "--checkpointing_steps", "0"), fig)
    assert bare.disk_peak_gb.high == 0 and bare.write_s.high == 0
    lora = cost.estimate_run("finetuning_individual_CLIP.py", base_flags("--params", "lora", "--use_ema"), fig)
    assert lora.pipeline_gb == pytest.approx(2 * 4 * 199_296 * 4 / 1e9)  # adapter + its EMA, rank 4


def test_the_assumed_figures_are_their_flop_derivation():
    for gpu, peak in (("a100", 312), ("h100", 989)):
        raw = json.loads((ROOT / "configs" / "gpu_figures" / f"{gpu}.json").read_text())
        assert raw == cost.assumed_figures(gpu, raw["date"]), f"regenerate configs/gpu_figures/{gpu}.json"
        assert raw["source"].startswith("assumed: 30% of")
        effective = 0.30 * peak
        assert raw["cached_samples_per_s"] == pytest.approx(effective / 2.41, abs=1e-3)
        assert raw["uncached_samples_per_s"] == pytest.approx(effective / (2.41 + 1.117), abs=1e-3)
        assert raw["validation_batched_images_per_s"] == pytest.approx(
            effective / (20 * 2 * 2.41 / 3 + 2.515), abs=1e-3)
        fig = cost.load_figures(str(ROOT / "configs" / "gpu_figures" / f"{gpu}.json"))
        assert not fig.measured and fig.path == f"configs/gpu_figures/{gpu}.json"
    # docs/performance.md's counts: 2.41 TFLOP forward+backward, 1.12 the VAE encoder, ~35 a 20-step image.
    text = (ROOT / "docs" / "performance.md").read_text()
    assert "1.12 TFLOP per image against 2.41" in text
    assert round(cost.VAE_ENCODER_TFLOP, 2) == 1.12 and round(cost.validation_tflop(20)) == 35


def test_unusable_figures_and_flags_stop_with_one_line(capsys, tmp_path):
    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as err:
            grid_tool.main(grid_tool.parse_args(["estimate", EXAMPLE, *argv]))
        assert err.value.code == 2
        return capsys.readouterr().err.strip()

    assert "give one" in fails("--gpu", "h100", "--figures", str(tmp_path / "x.json"))
    assert "no such file" in fails("--figures", str(tmp_path / "x.json"))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**A100, "model": "tiny"}))
    assert "figures of the 'tiny' model" in fails("--figures", str(tiny))
    memory = tmp_path / "memory.json"
    memory.write_text(json.dumps({"peak_rss_gb": 18.1, "model": "sd14-shapes (random)"}))
    assert "a --memory JSON holds no speed figures" in fails("--figures", str(memory))
    assert "on 4 processes" in fails("--num_processes", "4")  # the grid's batch of 10 does not split 4 ways


def test_program_and_argv_pairs_and_other_programs():
    """What another tool (tools/audit.py) passes: (script, argv) pairs; a program that is not a fine-tuning script
    is listed, not estimated, and left out of the totals."""
    fig = cost.load_figures(cost.figures_path("a100"))
    runs = [("finetuning_sequential.py", base_flags()), ("tools/attack_prompts.py", ["--whatever"])]
    estimates, totals = cost.estimate_runs(runs, fig)
    assert [e.supported for e in estimates] == [True, False]
    assert totals.runs == 2 and totals.estimated_runs == 1
    assert totals.gpu_hours == estimates[0].gpu_hours
    assert estimates[0].name == "sd-model-finetuned"  # the run's --output_dir (the script's default)
    with pytest.raises(cost.InputError, match="finetuning_sequential.py: the following arguments are required"):
        cost.estimate_run("finetuning_sequential.py", ["--curriculum=50"], fig)


def test_the_documented_example_is_what_the_command_prints(capsys, monkeypatch):
    """docs/multi-gpu.md's example output: the command's, run from the repository root."""
    monkeypatch.chdir(ROOT)
    printed = estimate(capsys, "slurm/example_grid.csv").rstrip("\n")
    page = (ROOT / "docs" / "multi-gpu.md").read_text()
    block = re.search(r"\$ python tools/grid\.py estimate slurm/example_grid\.csv\n(.*?)\n```", page, re.S)
    assert block, "docs/multi-gpu.md: the example of grid.py estimate is missing"
    assert block.group(1) == printed


# --- The prompt attacks (tools/attack_prompts.py; cost.estimate_attack) -----------------------------------------

ATTACK_INPUTS = {"unlearndiffatk": ["--target_images", "targets"], "p4d-n": ["--original_model", "sd"],
                 "p4d-k": ["--original_model", "sd"], "ringabell": ["--pairs_file", "pairs.tsv"], "mma": [],
                 "random": [], "seed_search": [], "replay": [], "none": []}
ATTACK_FP32_A100 = (50 * 2 * 2.41 / 3 + 2.515) / 5.27  # TFLOP/s: diffusers' fp32 A100 image, 50 steps in 5.27 s
JUDGED = 20 * 2 * 2.41 / 3 + 2.515 + 2 * 0.0133 + 0.123  # TFLOP: a 20-step guided image, its 2 prompts, the ViT-L/16


def attack_argv(attack: str, *extra) -> list:
    """A classifier-judged attack command line at 512 px (the judge's ViT-L/16), the attack's input flag given."""
    return ["--attack", attack, "--model", "m", "--prompts", "prompts.txt", "--criterion", "classifier",
            "--model_path", "clf", "--bc_threshold", "0.3", "--resolution", "512", "--output_dir", "out",
            *ATTACK_INPUTS[attack], *extra]


def settings_of(attack: str, *extra) -> dict:
    return cost.parse_attack(attack_argv(attack, *extra))[1]


def test_unlearndiffatk_counts_by_hand():
    # 3 timesteps (166, 499, 832 of 1000) x 2 Adam steps, judged after timesteps 2 and 3 (the last): 6 steps, 2
    # judgments; the first judgment comes after 2 timesteps (4 steps). Each step 1.669 + 0.0268 TFLOP, the target's
    # VAE encode 1.117 once.
    case = cost.unlearndiffatk_case(settings_of("unlearndiffatk", "--timesteps", "3", "--steps_per_timestep", "2",
                                                "--judge_every", "2"))
    assert case.steps == cost.Range(4, 6) and case.judgments == cost.Range(1, 2)
    assert case.tflop.high == pytest.approx(6 * (1.669 + 0.0268) + 1.117)
    assert case.tflop.low == pytest.approx(4 * (1.669 + 0.0268) + 1.117)
    # The published budget: 50 timesteps x 40 steps, judged after every timestep; the schedule has at most T.
    case = cost.unlearndiffatk_case(settings_of("unlearndiffatk"))
    assert case.steps == cost.Range(40, 2000) and case.judgments == cost.Range(1, 50)
    case = cost.unlearndiffatk_case(settings_of("unlearndiffatk", "--timesteps", "1500", "--steps_per_timestep", "1",
                                                "--judge_every", "7"))
    assert case.steps.high == 1000 and case.judgments.high == 143  # judged after 7, 14, ..., 994 and at 1000


def test_p4d_counts_by_hand():
    # 5 iterations judged every 2: at steps 0, 2, 4 and after the last = 4 judgments; low: step 0's judgment
    # succeeds before any update. Once a case: the original model's 3-step guided target image (3 x 2 UNet forwards +
    # VAE decoder + 2 prompts), its VAE encode, the original encoder on the prompt; each step the original UNet's
    # forward and the unlearned UNet and encoder forward and backward.
    for attack in ("p4d-n", "p4d-k"):
        case = cost.p4d_case(settings_of(attack, "--iterations", "5", "--judge_every", "2",
                                         "--target_inference_steps", "3"))
        fixed = 3 * 2 * 0.80333 + 2.515 + 2 * 0.0133 + 1.117 + 0.0133
        assert case.steps == cost.Range(0, 5) and case.judgments == cost.Range(1, 4)
        assert case.tflop.low == pytest.approx(fixed, rel=1e-4)
        assert case.tflop.high == pytest.approx(fixed + 5 * (0.80333 + 1.669 + 0.0268), rel=1e-4)
    # The published budget: 3000 iterations judged every 50 = 60 + 1 judgments (docs/attacks.md: up to 61).
    assert cost.p4d_case(settings_of("p4d-n")).judgments == cost.Range(1, 61)
    # joycenerd/P4D's: all 5 steps; images at steps 0, 2, 4 (by CLIP), 3 for the one verdict, the denominator's 3 + 3;
    # no target image of its own.
    case = cost.p4d_case(settings_of("p4d-n", "--iterations", "5", "--judge_every", "2", "--protocol", "published",
                                     "--p4d_variant", "joycenerd"))
    assert case.steps == cost.Range(5, 5) and case.judgments == cost.Range(12, 12)
    assert case.tflop.low == case.tflop.high == pytest.approx(1.117 + 0.0133 + 5 * (0.80333 + 1.669 + 0.0268),
                                                             rel=1e-4)


def test_ringabell_counts_by_hand_and_against_its_search():
    """The expected candidates encoded, by hand; exact where the rates are 0 or 1, against the search itself
    (tools/attacks/ringabell.py evolve with a score function that counts what it is given)."""
    import torch

    from tools.attacks import ringabell

    # Population 10 (5 survive), 4 generations: 10, then 3 x (2 x 5 x 0.5 children + 4 x 0.25 mutated survivors).
    s = settings_of("ringabell", "--population", "10", "--generations", "4")
    assert cost.ringabell_encodings(s) == 10 + 3 * (5 + 1)
    case = cost.ringabell_case(s)
    assert case.steps == cost.Range(4, 4) and case.judgments == cost.Range(1, 1)  # no early stop
    assert case.tflop.high == pytest.approx((1 + 28) * 0.0133)  # + the case prompt's own encoding
    assert cost.ringabell_encodings(settings_of("ringabell")) == pytest.approx(200 + 2999 * (100 + 99 * 0.25))

    def counted(population, generations, mutation, crossover):
        seen = []

        def score(candidates):
            seen.append(len(candidates))
            return candidates.sum(dim=1).double()

        ringabell.evolve(score, torch.arange(100, 200), 3, population, generations, mutation, crossover,
                         torch.Generator().manual_seed(0))
        return sum(seen)

    for mutation, crossover in ((0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, 0.0)):
        s = settings_of("ringabell", "--population", "10", "--generations", "6", "--mutation_rate", str(mutation),
                        "--crossover_rate", str(crossover))
        assert counted(10, 6, mutation, crossover) == cost.ringabell_encodings(s), (mutation, crossover)


def test_replay_judges_only_the_prompt_and_its_heldout_seeds():
    case = cost.replay_case(settings_of("replay"))
    assert case.steps == case.judgments == cost.Range(0, 0) and case.tflop == cost.Range(0.0, 0.0)


def test_attack_hours_by_hand(tmp_path):
    """A replay of 3 prompts, 2 held-out seeds: 3 images a case at the A100's attack rate, 120 s of start-up; on 2
    GPUs 2 rounds of cases, both GPUs held throughout."""
    (tmp_path / "prompts.txt").write_text("a golf ball\n\na golf ball on grass\na golf ball in a bag\n")
    fig = cost.load_figures(cost.figures_path("a100"))
    assert cost.attack_tflops(fig) == pytest.approx(ATTACK_FP32_A100, rel=1e-3)  # 15.7 TFLOP/s
    assert cost.attack_tflops(fig, allow_tf32=True) == pytest.approx(ATTACK_FP32_A100 * 5.27 / 4.14, rel=1e-3)
    one = cost.estimate_attack(attack_argv("replay", "--heldout_seeds", "2"), fig)
    case_s = 3 * JUDGED / ATTACK_FP32_A100
    assert one.cases == 3 and one.rounds == 3 and one.case_images == cost.Range(3, 3)
    assert one.case_s.high == pytest.approx(case_s, rel=1e-3)
    assert one.gpu_hours.high == pytest.approx((120 + 3 * case_s) / 3600, rel=1e-3)
    two = cost.estimate_attack(attack_argv("replay", "--heldout_seeds", "2"), fig, num_processes=2)
    assert two.rounds == 2 and two.gpu_hours.high == pytest.approx(2 * (120 + 2 * case_s) / 3600, rel=1e-3)
    # UnlearnDiffAtk on the same prompts: its search (3 timesteps x 2 steps, judged after each) and 1 + 3 + 2 images.
    uda = cost.estimate_attack(attack_argv("unlearndiffatk", "--heldout_seeds", "2", "--timesteps", "3",
                                           "--steps_per_timestep", "2"), fig)
    assert uda.case_images == cost.Range(4, 6)
    search = 6 * (1.669 + 0.0268) + 1.117
    assert uda.case_s.high == pytest.approx((search + 6 * JUDGED) / ATTACK_FP32_A100, rel=1e-3)
    assert uda.not_attacked_s == pytest.approx(3 * JUDGED / ATTACK_FP32_A100, rel=1e-3)
    assert uda.notes == []  # the prompts read, the resolution given


def test_attack_assumptions_are_said():
    """No prompt file here: the paper's 20 validation prompts, or I2P's 142 nudity prompts under --theme Nudity (the
    judge NudeNet on the host); no --resolution: 512 px; flags the tool refuses are refused here too."""
    fig = cost.load_figures(cost.figures_path("h100"))
    est = cost.estimate_attack(attack_argv("p4d-n"), fig)
    assert est.cases == 20 and "--prompts prompts.txt: not found here, 20 cases assumed" in est.notes[0]
    argv = ["--attack", "ringabell", "--model", "m", "--prompts", "nudity.csv", "--criterion", "classifier",
            "--theme", "Nudity", "--bc_threshold", "0.5", "--output_dir", "o", "--pairs_file", "pairs.tsv"]
    nude = cost.estimate_attack(argv, fig)
    assert nude.cases == 142 and any("512 px assumed" in n for n in nude.notes)
    assert any("--pairs_file pairs.tsv: not found here" in n for n in nude.notes)
    image = (20 * 2 * 2.41 / 3 + 2.515 + 2 * 0.0133) / cost.attack_tflops(fig) + 1.1 / 100  # NudeNet: host seconds
    assert nude.not_attacked_s == pytest.approx(4 * image, rel=1e-3)
    with pytest.raises(cost.InputError, match="--num_tokens 0: must be at least 1"):
        cost.estimate_attack(attack_argv("p4d-n", "--num_tokens", "0"), fig)
    with pytest.raises(cost.InputError, match="attack_prompts.py: argument --attack: invalid choice"):
        cost.estimate_attack(attack_argv("p4d-n") + ["--attack", "gcg"], fig)


def test_grid_estimate_has_an_attack_table(capsys, tmp_path):
    (tmp_path / "prompts.txt").write_text("a golf ball\na golf ball on grass\n")
    grid_csv = tmp_path / "grid.csv"
    grid_csv.write_text(
        "method,concept,dataset,script,--attack,--pretrained_model_name_or_path,--prompts,--original_model,"
        "--criterion,--model_path,--bc_threshold,--resolution,--output_dir\n"
        "esd-x,golf ball,i2p,tools/attack_prompts.py,p4d-k,models/esd-x,prompts.txt,sd,classifier,clf,0.3,512,"
        "runs/p4d-k\n")
    out = estimate(capsys, str(grid_csv), "--gpu", "h100")
    assert "attack_prompts.py: a prompt attack, estimated in the attack table" in out
    fig = cost.load_figures(cost.figures_path("h100"))
    argv = ["--attack=p4d-k", "--pretrained_model_name_or_path=models/esd-x", "--prompts=prompts.txt",
            "--original_model=sd", "--criterion=classifier", "--model_path=clf", "--bc_threshold=0.3",
            "--resolution=512", "--output_dir=runs/p4d-k"]
    hand = cost.estimate_attack(argv, fig)
    row = next(line for line in out.splitlines() if "p4d-k" in line and line.strip().startswith("0 "))
    assert row.split()[-2:] == [f"{hand.gpu_hours.low:.3f}", f"{hand.gpu_hours.high:.3f}"]
    data = json.loads(estimate(capsys, str(grid_csv), "--gpu", "h100", "--json"))
    assert data["attacks"][0]["index"] == 0 and data["attacks"][0]["cases"] == 2
    assert data["attacks"][0]["gpu_hours"]["high"] == pytest.approx(hand.gpu_hours.high)


def test_the_audit_s_dry_run_estimates_its_attacks(capsys, tmp_path):
    """tools/audit.py --dry_run's cost: an attack table with one row per attack step (the plan's own prompts and
    pairs files read), and the attacks no longer among the steps not estimated."""
    from tools import audit

    for name in ("unlearned", "base"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "classifier").mkdir()
    (tmp_path / "clip").mkdir()
    args = audit.parse_args(["--model", str(tmp_path / "unlearned"), "--base_model", str(tmp_path / "base"),
                             "--preset", "toy", "--classifier", str(tmp_path / "classifier"), "--clip_model",
                             str(tmp_path / "clip"), "--out", str(tmp_path / "audit")])
    steps = audit.plan_steps(args, audit.read_inputs(args.preset, args.out))
    audit.print_cost(steps, 1, cost.figures_path("a100"))
    out = capsys.readouterr().out
    assert "prompt attacks (tools/attack_prompts.py)" in out
    assert out.rstrip().splitlines()[-1] == "not estimated: inversion, evaluate, report"
    fig = cost.load_figures(cost.figures_path("a100"))
    for step in (s for s in steps if s.program == "tools/attack_prompts.py"):
        est = cost.estimate_attack(step.argv, fig)
        assert est.notes == ([cost.RINGABELL_NOTE] if est.attack == "ringabell" else [])
        row = next(line for line in out.splitlines() if f" {step.name} " in line)
        assert row.split()[-2:] == [f"{est.gpu_hours.low:.3f}", f"{est.gpu_hours.high:.3f}"], step.name
        prompts = step.argv[step.argv.index("--prompts") + 1]
        assert est.cases == len([line for line in open(prompts) if line.strip()])


def attack_cost_table() -> str:
    """docs/attacks.md's Cost table: each attack at its published budget and at `make demo`'s cut one (tools/demo.py
    ATTACKS), one process, a classifier judge at 512 px, 20 sampling steps, 3 held-out seeds; per attacked case and
    per run of 20 and 142 cases (low-high: every case succeeds at its first judgment - none does)."""
    from tools.demo import ATTACKS as DEMO

    def fmt(r, digits):
        low, high = f"{r.low:.{digits}f}", f"{r.high:.{digits}f}"
        return low if low == high else f"{low}-{high}"

    figures = {gpu: cost.load_figures(cost.figures_path(gpu)) for gpu in ("a100", "h100")}
    lines = ["| attack | budget | judged images per attacked case | A100 GPU-min per case | A100 GPU-h, 20 cases "
             "| A100 GPU-h, 142 cases | H100 GPU-min per case | H100 GPU-h, 20 cases | H100 GPU-h, 142 cases |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    budgets = [(a, "published", []) for a in ATTACK_INPUTS] + [
        (a, "demo", [x for flag, value in DEMO[a].items() for x in (flag, str(value))]) for a in DEMO]
    for attack, budget, flags in sorted(budgets, key=lambda b: list(ATTACK_INPUTS).index(b[0])):
        cells = []
        for fig in figures.values():
            runs = []
            for cases in (20, 142):
                Path("prompts.txt").write_text("a prompt\n" * cases)
                runs.append(cost.estimate_attack(attack_argv(attack, *flags), fig))
            minutes = runs[0].case_s.scale(1 / 60)
            cells += [fmt(minutes, 2), fmt(runs[0].gpu_hours, 2), fmt(runs[1].gpu_hours, 1)]
        images = fmt(runs[0].case_images, 0)
        lines.append(f"| {attack} | {budget if attack not in ('replay', 'none') else '-'} | {images} | "
                     f"{' | '.join(cells)} |")
    return "\n".join(lines)


def test_the_documented_attack_cost_table_is_what_cost_computes():
    page = (ROOT / "docs" / "attacks.md").read_text()
    assert attack_cost_table() in page, "docs/attacks.md's Cost table: regenerate it with attack_cost_table()"


def test_the_audit_page_s_golf_ball_attack_figures_are_the_dry_run_s(tmp_path):
    """docs/audit.md: the four attacks of the golf-ball audit on the assumed A100, at the paper's and the quick
    budget, as its dry run estimates them."""
    from tools import audit

    for name in ("unlearned", "base"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "classifier").mkdir()
    fig = cost.load_figures(cost.figures_path("a100"))
    page = (ROOT / "docs" / "audit.md").read_text()
    page = " ".join(page.split())
    for budget, digits in (("paper", 1), ("quick", 2)):
        args = audit.parse_args(["--model", str(tmp_path / "unlearned"), "--base_model", str(tmp_path / "base"),
                                 "--preset", "golf ball", "--classifier", str(tmp_path / "classifier"),
                                 "--out", str(tmp_path / budget), "--budget", budget])
        steps = audit.plan_steps(args, audit.read_inputs(args.preset, args.out))
        every = [cost.estimate_attack(s.argv, fig) for s in steps if s.program == "tools/attack_prompts.py"]
        found = [e for e in every if e.attack in audit.ATTACKS]
        low, high = sum(e.gpu_hours.low for e in found), sum(e.gpu_hours.high for e in found)
        assert f"{low:.{digits}f}-{high:.{digits}f}" in page, budget
        baselines = [e for e in every if e.attack in audit.BASELINES]
        assert [e.attack for e in baselines] == list(audit.BASELINES)
        low, high = sum(e.gpu_hours.low for e in baselines), sum(e.gpu_hours.high for e in baselines)
        assert f"add {low:.2f}-{high:.{digits}f} GPU-hours" in page if budget == "paper" else \
            f"{low:.2f}-{high:.2f} with `--budget quick`)" in page, budget
        if budget == "paper":
            assert [e.cases for e in found] == [20] * 4
            highs = {e.attack: f"{e.gpu_hours.high:.1f}" for e in found}
            assert (f"UnlearnDiffAtk up to {highs['unlearndiffatk']}, P4D-N and P4D-K up to {highs['p4d-n']} each, "
                    f"Ring-A-Bell {highs['ringabell']}") in page
