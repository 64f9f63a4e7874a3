"""tools/benchmark.py in its short CI mode: it runs every path and prints every figure (no timing asserted)."""

import json

import pytest

from conftest import launch

pytestmark = pytest.mark.slow


def _benchmark(tmp_path, *flags):
    """Run tools/benchmark.py with ``flags``; its stdout and the figures it wrote as JSON."""
    out = tmp_path / "bench.json"
    proc = launch("tools/benchmark.py", [*flags, "--json", str(out)], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_benchmark_short_mode(tmp_path):
    proc, figures = _benchmark(tmp_path, "--short")
    for key in ("cached_samples_per_s", "uncached_samples_per_s", "bare_fwd_bwd_samples_per_s",
                "validation_batched_images_per_s", "validation_one_at_a_time_images_per_s",
                "nudity_detector_s_per_100_images", "validation_without_retention_s", "validation_with_retention_s",
                "run_levers_on_s", "run_levers_off_s"):
        assert figures[key] > 0, key
        assert key in proc.stdout
    assert figures["device"] == "cpu" and figures["model"] == "tiny"
    # The ratios printed are the ratios of the figures printed.
    assert figures["cache_speedup"] == pytest.approx(figures["cached_samples_per_s"] / figures["uncached_samples_per_s"])
    assert figures["run_speedup"] == pytest.approx(figures["run_levers_off_s"] / figures["run_levers_on_s"])
    assert figures["retention_validation_time_ratio"] == pytest.approx(
        figures["validation_with_retention_s"] / figures["validation_without_retention_s"])
    assert figures["cached_peak_rss_gb"] > 0 and figures["uncached_peak_rss_gb"] > 0
    assert figures["budget_accelerator_gb_before_activations"] >= 0  # on the CPU everything is host memory


def test_benchmark_memory_mode_budget_per_lever_combination(tmp_path):
    proc, f = _benchmark(tmp_path, "--memory")
    # Each combination is the components it keeps on the GPU plus batch x activations per sample (bytes, exact).
    static = sum(f[f"component_{k}_bytes"] for k in ("trainable_parameters", "frozen_unet_parameters", "gradients",
                                                      "text_encoder", "vae"))
    lean = static + f["optimizer_state_8bit_bytes"] + f["offloaded_ema_update_bytes"] \
        + f["activations_per_pass_checkpointed_bytes"] + 10 * f["activations_per_sample_checkpointed_bytes"]
    assert f["gpu_budget_bytes[+ --use_8bit_adam (leanest)]"] == lean
    default = static + f["component_optimizer_state_bytes"] + f["component_ema_bytes"] \
        + f["activations_per_pass_bytes"] + 10 * f["activations_per_sample_bytes"]
    # Checkpointing keeps less per sample; activations grow with the batch.
    assert 0 < f["activations_per_sample_checkpointed_bytes"] < f["activations_per_sample_bytes"]
    assert f["gpu_budget_bytes[default (--use_ema)]"] == default
    # fp32 AdamW: two moments per trainable value; 8-bit: two bytes per value plus a scale per 256.
    n = f["component_trainable_parameters_bytes"] // 4
    assert f["component_optimizer_state_bytes"] == 8 * n
    assert 2 * n < f["optimizer_state_8bit_bytes"] < 8 * n / 3
    assert "gpu_budget_gb[default (--use_ema)]" in proc.stdout
    # The offloaded EMA's update holds a chunk and its temporary: here the whole tiny copy (under one chunk) twice,
    # each tensor's piece 64-byte aligned in the chunk buffer.
    assert 0 < 2 * f["component_ema_bytes"] <= f["offloaded_ema_update_bytes"] <= 2.5 * f["component_ema_bytes"]
    # The scoring models the runs keep on the GPU: CLIP ViT-B/32 (151.3M) and the ViT-L/16 classifier (303.3M), fp32.
    assert f["scorer_clip_vit_b32_bytes"] == 605110268 and f["scorer_vit_l16_classifier_bytes"] == 1213214728
