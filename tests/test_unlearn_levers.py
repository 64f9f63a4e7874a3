"""The training methods' shared levers (tools/unlearning/base.py): --gradient_checkpointing and --use_8bit_adam,
preemption (SIGTERM/SIGUSR1: a checkpoint, exit 75, --resume), data parallelism (sa under two processes).

In-process runs on the tiny model. The 8-bit optimizer is a stand-in module (this machine has no bitsandbytes
and no GPU) that records which class a method asked for and with what, and then builds the same fused torch
Adam/AdamW the method uses without it: a run with both levers must end in the bits of a run without them exactly
when gradient checkpointing changes nothing, and the stand-in tells whether the method asked for Adam8bit or
AdamW8bit as its published code uses Adam or AdamW.
"""

import copy
import dataclasses
import importlib.machinery
import os
import signal
import sys
import types

import pytest
import torch

from common import faults, numerics
from common.errors import InputError
from conftest import RESOLUTION, ROOT, launch
from tools import tiny, unlearn
from tools.unlearning import METHODS, base
from unlearn_helpers import card as _card, run as _run, weights as _weights

CONCEPT = "red circle"
COMMON = ["--device", "cpu", "--quiet", "--concept_probe", "0", "--checkpoint_every", "0"]
# Each method's published optimizer (docs/unlearning.md): ESD, SalUn and EraseDiff torch Adam; AC and SA AdamW.
KIND = {"esd-x": "Adam8bit", "salun": "Adam8bit", "erasediff": "Adam8bit", "ac": "AdamW8bit", "sa": "AdamW8bit"}


def _method_flags(name: str, data: dict) -> list:
    """A few steps of each training method on the tiny model (folders instead of generated images)."""
    return {
        "esd-x": ["--concept", CONCEPT, "--iterations", "4", "--ddim_steps", "3", "--probe_samples", "0",
                  "--learning_rate", "1e-3"],
        "salun": ["--concept", "a red circle", "--forget_data", data["red"], "--retain_data", data["blue"],
                  "--epochs", "1", "--batch_size", "2", "--learning_rate", "1e-3"],
        "ac": ["--concept", CONCEPT, "--anchor", "circle", "--anchor_data", data["green"], "--iterations", "3",
               "--batch_size", "2", "--learning_rate", "1e-2", "--probe_samples", "0"],
        "sa": ["--concept", CONCEPT, "--surrogate_data", data["blue"], "--replay_data", data["green"],
               "--fisher_samples", "2", "--fisher_timesteps", "2", "--iterations", "3", "--batch_size", "2",
               "--probe_samples", "0", "--ema_decay", "0.5"],
        "erasediff": ["--concept", CONCEPT, "--forget_data", data["red"], "--retain_data", data["blue"],
                      "--iterations", "2", "--inner_steps", "1", "--batch_size", "2", "--learning_rate", "1e-3",
                      "--probe_samples", "0"],
    }[name]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three imagefolders of 4 tiny shapes each: red circles, blue squares, green circles."""
    import numpy as np

    root = tmp_path_factory.mktemp("levers_data")
    rng = np.random.default_rng(0)
    return {colour: tiny.write_caption_folder(str(root / colour), [
        (tiny.draw_shape(shape, colour, RESOLUTION, rng), f"a {colour} {shape}") for _ in range(4)])
        for colour, shape in (("red", "circle"), ("blue", "square"), ("green", "circle"))}


@pytest.fixture(scope="module")
def cached_parts(assets):
    """The tiny model loaded once; each run gets it with a copy of its UNet (the only part these methods edit)."""
    from common.models import load_sd_parts

    parts = load_sd_parts(assets["sd"])
    mp = pytest.MonkeyPatch()
    mp.setattr(base, "load_parts", lambda model: dataclasses.replace(parts, unet=copy.deepcopy(parts.unet)))
    yield parts
    mp.undo()


class Fake8bit:
    """A stand-in bitsandbytes: records each optimizer asked for, builds the pinned torch one of the same kind."""

    def __init__(self):
        self.made = []
        optim = types.SimpleNamespace(Adam8bit=self._maker("Adam8bit", numerics.adam),
                                      AdamW8bit=self._maker("AdamW8bit", numerics.adamw))
        self.module = types.ModuleType("bitsandbytes")  # importlib.util.find_spec finds it by its __spec__
        self.module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
        self.module.optim = optim

    def _maker(self, name, real):
        def make(params, **kwargs):
            params = list(params)
            self.made.append((name, sum(p.numel() for p in params), kwargs))
            return real(params, **kwargs)
        return make


@pytest.fixture(scope="module")
def esd_runs(assets, data, cached_parts, tmp_path_factory):
    """ESD-x without levers, then with --gradient_checkpointing --use_8bit_adam (the stand-in)."""
    root = tmp_path_factory.mktemp("levers")
    fake = Fake8bit()
    real_checkpoint = torch.utils.checkpoint.checkpoint
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    flags = ["--method", "esd-x", "--model", assets["sd"], *_method_flags("esd-x", data), *COMMON]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.utils.checkpoint, "checkpoint", counted)
        mp.setitem(sys.modules, "bitsandbytes", fake.module)
        mp.setattr(base, "check_8bit_adam", lambda use, device: None)  # no GPU here: its refusal is tested below
        plain = _run([*flags, "--output_dir", str(root / "plain" / "model")])
        plain_calls, plain_made = len(calls), list(fake.made)
        levers = _run([*flags, "--gradient_checkpointing", "--use_8bit_adam",
                       "--output_dir", str(root / "levers" / "model")])
    return {"plain": plain, "levers": levers, "checkpointed_calls": (plain_calls, len(calls) - plain_calls),
            "optimizers": (plain_made, fake.made[len(plain_made):])}


def test_memory_levers_change_no_bit(esd_runs, assets):
    """Checkpointed (and the stand-in 8-bit optimizer, the same Adam): the same bits as without; it was on."""
    plain_calls, lever_calls = esd_runs["checkpointed_calls"]
    assert plain_calls == 0 and lever_calls > 0  # the UNet really was checkpointed, only when asked
    plain_made, made = esd_runs["optimizers"]
    assert plain_made == [] and [m[0] for m in made] == ["Adam8bit"] and made[0][2] == {"lr": 1e-3}
    a, b = _weights(esd_runs["plain"]), _weights(esd_runs["levers"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(not torch.equal(a[k], w) for k, w in _weights(assets["sd"]).items())  # and the run trained
    card_a, card_b = _card(esd_runs["plain"]), _card(esd_runs["levers"])
    assert card_a["results"]["loss"] == card_b["results"]["loss"]
    assert card_b["hyperparameters"]["gradient_checkpointing"] is True
    assert card_b["hyperparameters"]["use_8bit_adam"] is True


class Built(Exception):
    """Raised by the recording optimizer factory: the run stops once it has asked for its optimizer."""


# SalUn's and SA's runs are slower: SA's is checked in the two-process test below, SalUn's is not run here.
@pytest.mark.parametrize("name", ["ac", "erasediff"])
def test_each_method_asks_for_its_published_optimizer_in_8_bits_and_checkpoints_its_unet(name, assets, data,
                                                                                       cached_parts, tmp_path):
    """Each training method passes --use_8bit_adam to base.optimizer with the kind its published code uses (Adam
    or AdamW), and has diffusers' checkpointing on while it builds it (the run stops there)."""
    asked = []

    def record(params, kind, use_8bit_adam=False, **kwargs):
        asked.append((kind, use_8bit_adam, kwargs, checkpointing[0]()))
        raise Built

    checkpointing = [lambda: None]
    real_load = base.load_parts

    def load(model):
        parts = real_load(model)
        checkpointing[0] = lambda: bool(parts.unet.is_gradient_checkpointing)
        return parts

    flags = ["--method", name, "--model", assets["sd"], *_method_flags(name, data), *COMMON,
             "--gradient_checkpointing", "--use_8bit_adam", "--output_dir", str(tmp_path / "model")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "optimizer", record)
        mp.setattr(base, "load_parts", load)
        mp.setattr(base, "check_8bit_adam", lambda use, device: None)
        with pytest.raises(Built):
            _run(flags)
    kind = {"Adam8bit": "adam", "AdamW8bit": "adamw"}[KIND[name]]
    assert asked == [(kind, True, asked[0][2], True)] and asked[0][2]["lr"] > 0, asked


def test_the_training_methods_take_both_levers_and_uce_neither():
    levers = {"gradient_checkpointing", "use_8bit_adam"}
    for name in [*KIND, "esd-u"]:
        assert levers <= set(METHODS[name].defaults), name
    assert not levers & set(METHODS["uce"].defaults)


def test_use_8bit_adam_is_refused_before_anything_loads_without_bitsandbytes_or_cuda(assets, tmp_path, capsys,
                                                                                     monkeypatch):
    flags = ["--method", "esd-x", "--concept", "x", "--model", assets["sd"], "--use_8bit_adam", "--device", "cpu"]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable, as on this machine
    with pytest.raises(SystemExit) as err:
        unlearn.parse_args([*flags, "--output_dir", str(tmp_path / "o")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("unlearn.py: error: --use_8bit_adam: bitsandbytes is not installed")
    assert not (tmp_path / "o").exists()
    # Installed, but the run's device is the CPU (a GPU on the machine or not).
    monkeypatch.setitem(sys.modules, "bitsandbytes", Fake8bit().module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(InputError, match=r"^--use_8bit_adam: needs a CUDA device, not --device cpu$"):
        base.check_8bit_adam(True, "cpu")
    base.check_8bit_adam(True, "cuda:0")
    base.check_8bit_adam(False, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        base.check_8bit_adam(True, "cuda")


# ---- preemption -----------------------------------------------------------------


def test_sigterm_checkpoints_the_step_exits_75_and_resume_ends_in_the_same_bits(assets, data, esd_runs, tmp_path,
                                                                                capsys):
    """The fault hook's kill after step 2 (REVIVAL_FAULT=update:2) sends SIGTERM instead of SIGKILL: the run
    finishes step 2, writes its checkpoint and exits 75; --resume ends in the uninterrupted run's bits."""
    sig = signal.SIGTERM
    out = str(tmp_path / "model")
    flags = ["--method", "esd-x", "--model", assets["sd"], *_method_flags("esd-x", data), *COMMON, "--output_dir", out]

    def uncaught(signum, frame):  # instead of SIGTERM's default, which would end the test process
        raise AssertionError("the run did not catch SIGTERM")

    kill = os.kill
    with pytest.MonkeyPatch.context() as mp:
        before = signal.signal(sig, uncaught)
        mp.setenv("REVIVAL_FAULT", "update:2")
        mp.setattr(faults, "_counts", {})
        mp.setattr(faults.os, "kill", lambda pid, _: kill(pid, sig))
        try:
            with pytest.raises(SystemExit) as err:
                _run(flags)
            assert signal.getsignal(sig) is uncaught  # the run's handler is put back
        finally:
            signal.signal(sig, before)
    assert err.value.code == 75
    assert f"preempted ({signal.Signals(sig).name}) after step 2 of 4" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["PREEMPTED", base.CHECKPOINT_DIR] and base.checkpoint_info(out)["step"] == 2
    _run([*flags, "--resume"])
    assert not os.path.exists(os.path.join(out, "PREEMPTED"))
    a, b = _weights(esd_runs["plain"]), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _card(out)["training"]["resumed_from_step"] == 2
    assert _card(out)["results"]["loss"] == _card(esd_runs["plain"])["results"]["loss"]


def test_sigusr1_is_caught_too_and_the_handlers_are_put_back():
    before = {s: signal.getsignal(s) for s in base.Preemption.SIGNALS}
    with base.Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.signal == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in base.Preemption.SIGNALS} == before


# ---- data parallelism -------------------------------------------------------------

SA_PARALLEL = ["--method", "sa", "--concept", CONCEPT, "--surrogate", "blue square", "--surrogate_images", "3",
               "--replay_prompts", "green circle", "yellow cross", "--replay_images", "5", "--generation_steps", "2",
               "--fisher_samples", "3", "--fisher_timesteps", "2", "--iterations", "3", "--batch_size", "3",
               "--learning_rate", "1e-3", "--ewc_lambda", "1e4", "--ema_decay", "0", "--probe_samples", "0",
               "--seed", "3", *COMMON]


def test_sa_on_two_processes_ends_where_one_process_does(assets, cached_parts, tmp_path):
    """SA under `accelerate launch --num_processes 2` (CPU, gloo): each process its rows of each batch of 3 (2 + 1),
    its Fisher images, its batches of the generated images; the gradients summed. The same images (to a pixel
    level: the launched processes run one thread each), Fisher and losses as one process, and the same weights to
    the rounding of the sums' order. The one-process run also has both memory levers (the stand-in 8-bit AdamW is
    the pinned AdamW): SA asks for AdamW8bit, checkpoints its UNet, and neither changes the result."""
    fake, checkpointed = Fake8bit(), []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        checkpointed.append(1)
        return real_checkpoint(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "bitsandbytes", fake.module)
        mp.setattr(base, "check_8bit_adam", lambda use, device: None)
        mp.setattr(torch.utils.checkpoint, "checkpoint", counted)
        one = _run([*SA_PARALLEL, "--model", assets["sd"], "--output_dir", str(tmp_path / "one" / "model"),
                    "--gradient_checkpointing", "--use_8bit_adam"])
    assert [m[0] for m in fake.made] == ["AdamW8bit"] and fake.made[0][2] == {"lr": 1e-3, "weight_decay": 0.01}
    assert checkpointed
    two = str(tmp_path / "two" / "model")
    proc = launch("tools/unlearn.py", [*SA_PARALLEL, "--model", assets["sd"], "--output_dir", two], str(ROOT),
                  num_processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    for role in ("surrogate", "replay"):
        for name in ("metadata.jsonl", "generation.json"):
            a, b = (open(os.path.join(d, base.DATA_DIR, role, name)).read() for d in (one, two))
            assert a == b, (role, name)
        for path in base.load_image_set(os.path.join(one, base.DATA_DIR, role), "x").paths:
            rel = os.path.relpath(path, os.path.join(one, base.DATA_DIR, role))
            a, b = (np.asarray(Image.open(os.path.join(d, base.DATA_DIR, role, rel)), dtype=int) for d in (one, two))
            assert np.abs(a - b).max() <= 1, rel  # seen: one pixel of one image 1/255 apart
    f1, f2 = (load_file(_card(d)["results"]["fisher"]["file"]) for d in (one, two))
    num = sum(float(torch.linalg.vector_norm(f1[k] - f2[k]) ** 2) for k in f1) ** 0.5
    den = sum(float(torch.linalg.vector_norm(f1[k]) ** 2) for k in f1) ** 0.5
    assert num < 1e-2 * den  # the Fisher of 3 images summed in another order (and that pixel)
    c1, c2 = _card(one), _card(two)
    assert c2["results"]["loss"] == pytest.approx(c1["results"]["loss"], rel=1e-5)  # seen: 1.4e-6
    for term in ("forget", "replay", "ewc"):
        assert c2["results"]["loss_terms"][term] == pytest.approx(c1["results"]["loss_terms"][term], rel=1e-5)
    w0, w1, w2 = _weights(assets["sd"]), _weights(one), _weights(two)
    count = sum(w.numel() for w in w1.values())
    moved = sum(float((w1[k] - w0[k]).abs().sum()) for k in w1) / count
    diff = sum(float((w1[k] - w2[k]).abs().sum()) for k in w1) / count
    print(f"SA 1 vs 2 processes: mean |w1 - w0| {moved:.3g}, mean |w2 - w1| {diff:.3g}")
    # Adam divides by each gradient's RMS: rounding noise in a near-zero gradient can move that weight by ~lr per
    # step, so the mean is compared (seen: 1.6e-3 of the distance moved); a process stepping on its own rows'
    # gradient, or adding the EWC term twice, moves the weights apart by a good part of it.
    assert moved > 1e-4 and diff < 1e-2 * moved
