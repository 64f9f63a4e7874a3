"""The GPU speed settings no CPU run can time: cuDNN benchmarking, TF32 in every fp32 program, no compiled model.

What a CPU can check is that each setting is what docs/gpu.md says when a run starts: cuDNN picks its
convolution algorithms by timing unless --deterministic, every program that trains or searches in fp32 takes
--allow_tf32 and applies it, and an accelerate config that asks for a dynamo backend is overridden.
"""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, launch_env


@pytest.fixture
def restore_backends():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
              torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = before[:2]
    torch.use_deterministic_algorithms(before[2])
    torch.backends.cudnn.deterministic = before[3]


def test_cudnn_benchmarks_unless_deterministic(restore_backends):
    """A run's shapes repeat every step, so timing cuDNN's algorithms once pays; --deterministic turns it off,
    because the chosen algorithm can differ between runs."""
    from common.determinism import set_deterministic

    set_deterministic(False)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    set_deterministic(True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic


def test_set_tf32_switches_matrix_multiplies_both_ways(restore_backends):
    from common.precision import set_tf32

    set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32
    set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("tool", ["tools/unlearn.py", "tools/concept_inversion.py", "tools/attack_prompts.py",
                                  "finetuning_individual_CLIP.py", "finetuning_sequential.py"])
def test_every_fp32_program_takes_allow_tf32(tool):
    """The fine-tuning scripts had it; the tools that train or search in fp32 on a GPU had not (each program's own
    parser, as docs/flags.md renders it)."""
    from tools.flags_reference import load_parser

    flags = {o for action in load_parser(tool)._actions for o in action.option_strings}
    assert "--allow_tf32" in flags


def test_unlearn_applies_allow_tf32(assets, tmp_path, monkeypatch, restore_backends):
    """The flag reaches the backend: a UCE edit (closed form, seconds) with and without it."""
    from tools import unlearn

    seen = []
    import common.precision

    original = common.precision.set_tf32
    monkeypatch.setattr(common.precision, "set_tf32", lambda enabled: (seen.append(enabled), original(enabled)))
    for flag, name in (([], "off"), (["--allow_tf32"], "on")):
        unlearn.main(unlearn.parse_args(["--method", "uce", "--erase", "red circle", "--model", assets["sd"],
                                         "--output_dir", str(tmp_path / name), "--quiet", "--device", "cpu", *flag]))
    assert seen == [False, True] and torch.backends.cuda.matmul.allow_tf32


ASKED_FOR_INDUCTOR = """
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from common.session import make_accelerator
acc = make_accelerator("no", sys.argv[1], "logs")
print("backend", acc.state.dynamo_plugin.backend.value)
"""


def test_an_accelerate_config_asking_for_dynamo_is_overridden(tmp_path):
    """`accelerate config` can set a dynamo backend for every launch: the toolkit's model is not compiled, and the
    log says so (accelerate launch passes the config's choice as ACCELERATE_DYNAMO_BACKEND)."""
    env = launch_env({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"})
    proc = subprocess.run([sys.executable, "-c", ASKED_FOR_INDUCTOR, str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ACCELERATE_DYNAMO_BACKEND=INDUCTOR (accelerate config): not used" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "backend NO"
