"""GPU efficiency the CPU can only partly show (docs/gpu.md): the offloaded EMA's one round trip into the same
host buffers, foreach EMA updates, DDP gradients as bucket views (and the budget's count of the buckets),
host-to-device copies through one non-blocking helper, and --deterministic's switches.

What a CPU cannot show, and these tests do not claim: that the GPU stream really overlaps the copies, or that no
host sync happens on CUDA. They pin the code paths and that results are unchanged by them.
"""

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import EMAModel

from common.ema import OffloadedEMA, make_ema, round_trip_step


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def test_ema_uses_foreach_and_offload_picks_the_host_copy():
    params = _params()
    on_device, offloaded = make_ema(params, 0.9, offload=False), make_ema(params, 0.9, offload=True)
    assert type(on_device) is EMAModel and on_device.foreach
    assert isinstance(offloaded, OffloadedEMA) and offloaded.foreach
    assert all(s.device.type == "cpu" for s in offloaded.shadow_params)


def test_round_trip_updates_the_same_host_buffers_with_the_plain_update():
    params = _params()
    reference = EMAModel(params, decay=0.9)  # diffusers' per-tensor update, never moved
    ema = OffloadedEMA(params, decay=0.9, foreach=True)
    buffers = [s.data_ptr() for s in ema.shadow_params]
    for k in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(0.5 + k)
        reference.step(params)
        # The CPU stands in for the device: copy=True makes the trip real (new tensors, then a copy back).
        assert round_trip_step(ema, params, torch.device("cpu")) is None  # no event: a CPU copy is done at once
    assert [s.data_ptr() for s in ema.shadow_params] == buffers  # the same host buffers: nothing re-allocated
    assert ema.optimization_step == reference.optimization_step == 3
    for s, r in zip(ema.shadow_params, reference.shadow_params):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema.shadow_params[0], _params()[0])  # it did move


class _Event:
    def __init__(self):
        self.waited = 0

    def synchronize(self):
        self.waited += 1


@pytest.mark.parametrize("read", ["state_dict", "copy_to", "to", "load_state_dict"])
def test_host_reads_wait_for_the_copy_back(read):
    params = _params()
    ema = OffloadedEMA(params, decay=0.9, foreach=True)
    state = ema.state_dict()
    event = ema._copied_back = _Event()
    {"state_dict": lambda: ema.state_dict(), "copy_to": lambda: ema.copy_to(_params(1)),
     "to": lambda: ema.to("cpu"), "load_state_dict": lambda: ema.load_state_dict(state)}[read]()
    assert event.waited == 1 and ema._copied_back is None


def test_to_device_pins_and_copies_without_blocking_for_cuda():
    from common.encoding import to_device

    calls = []

    class FakeHostTensor:
        device = torch.device("cpu")

        def pin_memory(self):
            calls.append("pin")
            return self

        def to(self, device, non_blocking=False):
            calls.append(("to", str(device), non_blocking))
            return "on device"

    assert to_device(FakeHostTensor(), "cuda") == "on device"
    assert calls == ["pin", ("to", "cuda", True)]
    x = torch.arange(6.0)
    assert torch.equal(to_device(x, "cpu"), x)  # elsewhere: a plain copy, same values


def test_every_host_to_device_copy_of_a_micro_step_goes_through_to_device(assets, monkeypatch):
    """Cached encoder: row indices, flips and latent noise; trainer: timesteps, noise, applied noise (6 per
    micro-batch), and the same losses as before."""
    from accelerate import Accelerator

    import common.encoding as encoding
    import common.training as training
    from common.data import ImageTransform, load_training_data
    from common.models import load_sd_parts

    ds = load_training_data(assets["data"], None, "prompt")
    cfg = training.TrainConfig(learning_rate=1e-4, train_batch_size=5, seed=3, use_ema=True)
    losses, calls = [], []
    original = encoding.to_device

    def spy(tensor, device):
        calls.append(tuple(tensor.shape))
        return original(tensor, device)

    for spying in (False, True):
        if spying:
            monkeypatch.setattr(encoding, "to_device", spy)
            monkeypatch.setattr(training, "to_device", spy)
        parts = load_sd_parts(assets["sd"])
        enc = encoding.CachedEncoder(parts, ImageTransform(32, center_crop=True, random_flip=True), "cpu",
                                     torch.float32)
        trainer = training.ChunkTrainer(Accelerator(cpu=True), parts, enc, cfg, 10)
        trainer.reset_chunk(0)
        enc.prepare(ds, (0, 10))
        calls.clear()  # the chunk's encoding is done once, not per micro-step
        losses.append(trainer.train_epoch(ds, (0, 10), 0, 0)["update_losses"])
    micro_batches = 2
    assert len(calls) == 6 * micro_batches
    assert sorted(set(calls)) == sorted({(5,), (5, 4, 8, 8)})  # indices/flips/timesteps and noise-shaped draws
    assert losses[0] == losses[1]


def test_make_accelerator_sets_bucket_views_and_deterministic(tmp_path, monkeypatch):
    from common.session import make_accelerator

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # set by the run, removed again after the test

    acc = make_accelerator("no", str(tmp_path), "logs", deterministic=True)
    assert acc.ddp_handler.to_kwargs() == {"gradient_as_bucket_view": True}
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    make_accelerator("no", str(tmp_path), "logs", deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_deterministic_context_restores_the_flags():
    from common.determinism import deterministic, deterministic_state

    before = deterministic_state()
    with deterministic(True):
        assert deterministic_state()["deterministic_algorithms"] is True
    after = deterministic_state()
    assert {k: after[k] for k in ("deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark")} == \
        {k: before[k] for k in ("deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark")}


def test_deterministic_flag_reaches_the_run(tmp_path, monkeypatch):
    import common.entry as entry
    from common import cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    parser = cli.training_parser("x.py", "doc")
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--curriculum", "10",
            "--validation_prompts", str(prompts), "--output_dir", str(tmp_path / "out")]
    seen = []
    monkeypatch.setattr(entry, "open_run", lambda **kw: seen.append(kw["deterministic"]))
    for extra in ([], ["--deterministic"]):
        args = parser.parse_args(base + extra)
        args.script = "x.py"
        entry._open(args, [10], 1, lambda device: [], "sequential")
    assert seen == [False, True]


def test_budget_counts_ddp_buckets_beyond_the_gradients(tmp_path):
    """With gradient_as_bucket_view the gradients are the buckets (nothing more); without, a second copy."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from common.memory import ddp_bucket_bytes

    model = torch.nn.Linear(64, 32)
    trainable = list(model.parameters())
    assert ddp_bucket_bytes(model, trainable) == {"bytes": 0, "device": "-"}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        views = ddp_bucket_bytes(DistributedDataParallel(model, gradient_as_bucket_view=True), trainable)
        copies = ddp_bucket_bytes(DistributedDataParallel(model, gradient_as_bucket_view=False), trainable)
    finally:
        dist.destroy_process_group()
    assert views == {"bytes": 0, "device": "cpu"}
    assert copies == {"bytes": (64 * 32 + 32) * 4, "device": "cpu"}


def test_benchmark_times_deterministic_only_where_it_costs():
    from tools.benchmark import training_paths

    assert training_paths(cuda=False) == [("cached", True, False), ("uncached", False, False)]
    assert training_paths(cuda=True)[-1] == ("deterministic_cached", True, True)
