"""The cost before you submit (tools/cost.py, tools/grid.py estimate): the protocol's counts, recomputed by hand, the
hours from the figures' rates, the disk from the saving rules, the assumed figures from their FLOP counts, and the
documented example. Fast: no model is built, no program launched."""

from __future__ import annotations

import json
import re

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
