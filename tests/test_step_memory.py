"""common/step_memory.py and tools/benchmark.py --memory --unlearning on the tiny UNet: the accounting against bytes
counted by hand, each method's trained set is the one its run selects, and docs/memory.md quotes the constants."""

import inspect
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def unet(assets):
    from common.models import load_sd_parts

    return load_sd_parts(assets["sd"]).unet


def test_phase_budget_is_the_components_counted_by_hand():
    from common.step_memory import Phase, phase_budget

    # ESD-x's trained step on a UNet of 1000 values, 100 of them trained: weights 4, gradients 4, Adam 8 bytes per
    # trained value; the other 900 and the frozen copy's 1000 at 4 bytes; one image of 50 activation bytes.
    phase = Phase("step", trained=100, frozen=900, copies=(("frozen UNet", 1000),), grad_images=1, no_grad_images=0)
    b = phase_budget(phase, per_image=50, no_grad_per_image=7)
    assert b["total"] == 400 + 400 + 800 + 3600 + 4000 + 50
    # 8-bit Adam: 2 bytes per value plus two fp32 scales per 256 values; a no-grad forward adds its own peak.
    lean = phase_budget(Phase("s", trained=256, mask=256, grad_images=2, no_grad_images=3), 10, 7, eight_bit=True)
    assert lean["optimizer_state"] == 2 * 256 + 8 and lean["mask"] == 256
    assert lean["total"] == 1024 + 1024 + 520 + 256 + 2 * 10 + 3 * 7


def test_the_step_budget_is_its_largest_phase():
    from common.step_memory import Phase, step_budget

    inner = Phase("inner", trained=10, copies=(("theta_i", 10),), grad_images=1)
    outer = Phase("outer", trained=10, grad_images=2)
    assert step_budget([inner, outer], per_image=50, no_grad_per_image=0)[0] == "outer"  # 260 > 250
    assert step_budget([inner, outer], per_image=5, no_grad_per_image=0)[0] == "inner"  # 205 > 170


def test_each_method_counts_the_trained_set_its_run_selects(unet):
    """The benchmark counts each method's parameters with the function its run calls (not a copy of its rule)."""
    from tools import benchmark
    from tools.unlearning import ac, erasediff, esd, sa, salun

    rows = benchmark.unlearning_phases(unet, text_encoder_bytes=0)
    calls = {"esd-x": (esd.run, "esd_trainable_names(unet, settings[\"variant\"])", esd.esd_trainable_names, "esd-x"),
             "esd-u": (esd.run, "esd_trainable_names(unet, settings[\"variant\"])", esd.esd_trainable_names, "esd-u"),
             "salun": (salun.run, "trainable_names(unet, settings[\"train_method\"])", salun.trainable_names, "full"),
             "ac": (ac.run, "trainable_names(unet, settings[\"train_params\"])", ac.trainable_names, "xattn"),
             "sa": (sa.run, "sa_trainable_names(unet, settings[\"train_method\"])", sa.sa_trainable_names, "full"),
             "erasediff": (erasediff.run, "trainable_names(unet, settings[\"train_method\"])",
                           erasediff.trainable_names, "noxattn")}
    params = dict(unet.named_parameters())
    for method, (run, call, names, default) in calls.items():
        assert call in inspect.getsource(run), method
        flag = {"esd-x": None, "esd-u": None, "salun": "--train_method", "ac": "--train_params",
                "sa": "--train_method", "erasediff": "--train_method"}[method]
        if flag:  # the benchmark's set is the method's default
            module = {"salun": salun, "ac": ac, "sa": sa, "erasediff": erasediff}[method]
            assert next(f.default for f in module.FLAGS if f.name == flag) == default, method
        assert rows[method][1] == sum(params[n].numel() for n in names(unet, default)), method
    total = sum(p.numel() for p in unet.parameters())
    assert rows["sa"][1] == rows["salun"][1] == total
    assert 0 < rows["esd-x"][1] + rows["esd-u"][1] == total


def test_unlearning_figures_on_the_tiny_unet(unet, capsys):
    """Each budget is its largest phase at the measured fp32 activations; the table has one row per method."""
    from common.step_memory import step_budget
    from tools import benchmark

    args = types.SimpleNamespace(resolution=32)
    f = benchmark.unlearning_figures(args, unet, text_encoder_bytes=1000)
    assert 0 < f["fp32_activations_per_image_checkpointed_bytes"] < f["fp32_activations_per_image_bytes"]
    phases = benchmark.unlearning_phases(unet, 1000)
    for method, (_, _, _, steps) in phases.items():
        _, budget = step_budget(steps, f["fp32_activations_per_image_bytes"], f["no_grad_forward_per_image_bytes"])
        assert f[f"{method}_budget_bytes[defaults]"] == budget["total"]
        assert f[f"{method}_budget_bytes[+ 8-bit Adam (no flag yet)]"] <= \
            f[f"{method}_budget_bytes[--gradient_checkpointing]"] <= f[f"{method}_budget_bytes[defaults]"]
    # ESD: weights, gradients and Adam of the trained set, the rest of the UNet, its frozen copy, one image.
    n, total = f["esd-x_trained_values"], f["unet_values"]
    assert f["esd-x_budget_bytes[defaults]"] == 16 * n + 4 * (total - n) + 4 * total + max(
        f["fp32_activations_per_image_bytes"], 2 * f["no_grad_forward_per_image_bytes"])
    table = benchmark.unlearning_table(f)
    assert len(table.splitlines()) == 2 + len(phases) and "| `sa` |" in table


def test_docs_memory_md_quotes_the_sd14_constants():
    from common.step_memory import SD14_512_FP32
    from common.memory import GB

    text = (ROOT / "docs" / "memory.md").read_text()
    section = " ".join(text[text.index("## Unlearning methods at SD-1.4 size"):].split())  # lines joined
    quoted = re.search(r"fp32 activations per image: ([\d.]+) GiB \(([\d.]+) GiB checkpointed\); a no-grad forward "
                       r"([\d.]+) GiB", section)
    assert quoted, "docs/memory.md: the fp32 activation figures"
    for group, key in ((1, "per_image"), (2, "per_image_checkpointed"), (3, "no_grad_per_image")):
        assert float(quoted.group(group)) == round(SD14_512_FP32[key] / GB, 3)
