"""GPU efficiency the CPU can only partly show (docs/gpu.md): the offloaded EMA's round trip in chunks into the
same host buffers (one chunk on the device at a time, diffusers' numbers bit for bit), foreach EMA updates, DDP
gradients as bucket views (and the budget's count of the buckets), every host-to-device copy of the training loop
through one non-blocking helper (whoever makes it: HostDeviceTracker), and --deterministic's switches.

What a CPU cannot show, and these tests do not claim: that the GPU stream really overlaps the copies, or that no
host sync happens on CUDA. They pin the code paths and that results are unchanged by them.
"""

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch.utils._python_dispatch import TorchDispatchMode

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


class LiveBytes(TorchDispatchMode):
    """The most bytes alive at once in storages made inside the mode: on the CPU, a stand-in for a device's peak
    allocation (every tensor an op makes is counted until the last tensor on its storage is gone)."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> (bytes, weak references of the tensors on it)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if any(r() is not None for r in v[1])}  # freed: gone
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key in self.live:
                    self.live[key][1].append(weakref.ref(t))
                elif key not in inputs:  # new memory (not a view or an in-place result)
                    self.live[key] = (t.untyped_storage().nbytes(), [weakref.ref(t)])
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return out


def _model_params(seed=0, sizes=((40, 25), (1000,), (7, 3, 3), (300,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in sizes]


def _update(params, k):
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) * (k + 1) + i).view_as(p))


def test_offloaded_update_holds_one_chunk_on_the_device_not_the_whole_copy(monkeypatch):
    """The round trip's device memory: the module's chunk (a buffer) and the foreach update's temporary of at most as
    many bytes, however large the EMA copy (here 4x the chunk)."""
    import common.ema as ema_module

    params = _model_params()
    ema_bytes = sum(p.numel() * 4 for p in params)  # 9452 bytes of fp32
    chunk = 2048
    monkeypatch.setattr(ema_module, "ROUND_TRIP_CHUNK_BYTES", chunk, raising=False)
    ema = OffloadedEMA(params, decay=0.9, foreach=True)
    _update(params, 0)
    with LiveBytes() as live:
        round_trip_step(ema, params, torch.device("cpu"))  # the CPU stands in for the device: every copy is real
    assert 0 < live.peak <= 2 * chunk + 64 * 4, f"peak {live.peak} bytes for a {chunk}-byte chunk (EMA {ema_bytes})"


@pytest.mark.parametrize("chunk_bytes", [4, 36, 1000, 4004, 2 ** 30])
def test_chunked_round_trip_equals_the_library_update_bit_for_bit(chunk_bytes):
    """Any chunk size (one value, pieces of tensors, whole tensors, everything at once): the numbers of diffusers'
    EMAModel.step over the whole copy, its decay schedule and step count, frozen tensors copied, the same buffers."""
    params = _model_params(sizes=((40, 25), (1001,), (7, 3, 3), (300,), (6, 5)))
    params[2].requires_grad_(False)  # copied, not averaged (EMAModel.step's rule)
    params[4] = torch.nn.Parameter(params[4].detach().t())  # not contiguous: travels whole
    reference = EMAModel(params, decay=0.999, foreach=True)  # what the run uses on the device, never moved
    ema = OffloadedEMA(params, decay=0.999, foreach=True)
    buffers = [s.data_ptr() for s in ema.shadow_params]
    for k in range(4):
        _update(params, k)
        reference.step(params)
        assert round_trip_step(ema, params, torch.device("cpu"), chunk_bytes=chunk_bytes) is None
        assert ema.optimization_step == reference.optimization_step == k + 1
        assert ema.cur_decay_value == reference.cur_decay_value  # get_decay's warm-up: 0, 2/11, 3/12, 4/13
        assert all(torch.equal(s, r) for s, r in zip(ema.shadow_params, reference.shadow_params)), k
    assert [s.data_ptr() for s in ema.shadow_params] == buffers and ema.foreach


def test_chunk_plan_covers_every_value_once_within_the_chunk():
    from common.ema import chunk_plan, round_trip_bytes

    tensors = [torch.zeros(10), torch.zeros(3, 7).t(), torch.zeros(25), torch.zeros(0),
               torch.zeros(4, dtype=torch.float64)]
    for chunk in (4, 12, 40, 100, 10 ** 6):
        plan = chunk_plan(tensors, tensors, chunk)
        covered = sorted((i, a, b) for c in plan for i, a, b in c)
        for i, t in enumerate(tensors):  # each tensor's ranges tile it exactly
            ends = [(a, b) for j, a, b in covered if j == i]
            if t.numel() == 0:
                assert ends == []  # nothing to move
                continue
            assert [a for a, _ in ends] == [0] + [b for _, b in ends[:-1]] and ends[-1][1] == t.numel()
        for c in plan:
            size = sum((b - a) * tensors[i].element_size() for i, a, b in c)
            # Over the chunk only: the non-contiguous tensor (whole) or a single value larger than the chunk.
            assert size <= chunk or (len(c) == 1 and (c[0][0] == 1 or c[0][2] - c[0][1] == 1)), (chunk, c)
    assert len(chunk_plan(tensors, tensors, 10 ** 6)) == 1
    assert round_trip_bytes([torch.zeros(1000)], 1024) == 2 * 1024  # the buffer and the update's temporary
    assert round_trip_bytes([torch.zeros(100)], 1024) == 2 * 400  # never more than the copy itself


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
    """Cached encoder: row indices, flips and latent noise; trainer: timesteps, the noise schedule's values at them,
    noise, applied noise (7 per micro-batch), and the same losses as before."""
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
    assert len(calls) == 7 * micro_batches
    assert sorted(set(calls)) == sorted({(5,), (5, 4, 8, 8)})  # indices/flips/timesteps and noise-shaped draws
    assert losses[0] == losses[1]


_NAMES = {}  # torch function -> its qualified name (resolve_name is slow)


class HostDeviceTracker(torch.overrides.TorchFunctionMode):
    """Tells, on the CPU, which tensors a GPU run would hold in host memory, and records every copy of one to the
    device that bypasses common.data.to_device (a pageable or blocking copy: the host waits), and every read of a
    device tensor on the host (a sync).

    On the CPU every such copy is a no-op that never reaches the dispatcher (the tensor is on the CPU already), so
    a dispatch mode sees nothing. A torch-function mode sees every Python-level call with the destination it names,
    no-ops included, and follows where each tensor lives in a GPU run: on the host when made by a factory that
    names no device (the CPU generator's draws, host index tensors, tokenizer ids, transformed pixels) or by an op
    whose tensor inputs are all on the host, or when pre-registered (``host``: the noise scheduler's tables, which
    diffusers never moves); on the device otherwise (model weights, the latent cache, gradients, factories given
    the run's device, and whatever to_device returns).
    """

    COPIES = {"torch.Tensor.to", "torch.Tensor.cuda", "torch.Tensor.copy_", "torch.Tensor.new_tensor",
              "torch.tensor", "torch.as_tensor", "torch.asarray", "torch._foreach_copy_"}
    READS = {"torch.Tensor.item", "torch.Tensor.tolist", "torch.Tensor.cpu", "torch.Tensor.numpy",
             "torch.Tensor.__bool__", "torch.Tensor.__float__", "torch.Tensor.__int__", "torch.Tensor.__index__"}

    def __init__(self, host=()):
        super().__init__()
        self._host = {}  # id -> weak reference of each tensor a GPU run would hold in host memory
        self._tag(host)
        self.bypassing, self.via_helper, self.reads = [], 0, []

    def _tag(self, tensors) -> None:
        import weakref

        for t in tensors:
            self._host[id(t)] = weakref.ref(t, lambda _, key=id(t): self._host.pop(key, None))

    def on_host(self, t) -> bool:
        """Whether a GPU run would hold ``t`` in host memory."""
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    @staticmethod
    def _caller():
        """file:line function of the first frame outside torch (where the call was made), and whether to_device is
        on the stack."""
        import sys

        from common.data import to_device

        frame, via, caller = sys._getframe(2), False, None
        while frame is not None:
            if caller is None and not frame.f_code.co_filename.startswith(os.path.dirname(torch.__file__)):
                caller = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"
            via = via or frame.f_code is to_device.__code__
            frame = frame.f_back
        return caller, via

    @staticmethod
    def _names_device(name, args, kwargs) -> bool:
        """Whether a copying call names a destination device (a dtype-only .to or a host-side tensor() does not)."""
        if name in ("torch.Tensor.cuda", "torch.Tensor.copy_", "torch._foreach_copy_", "torch.Tensor.new_tensor"):
            return True
        if name != "torch.Tensor.to":
            return kwargs.get("device") is not None
        return any(isinstance(a, (torch.Tensor, torch.device, str)) or (isinstance(a, int) and not isinstance(a, bool))
                   for a in (*args[1:], kwargs.get("device"), kwargs.get("other")) if a is not None)

    def __enter__(self):
        self._from_numpy = torch.from_numpy  # not a torch function a mode sees: tag what it makes (pixels)
        torch.from_numpy = lambda array: self._tagged(self._from_numpy(array))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def _tagged(self, t):
        self._tag([t])
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        name = _NAMES.get(func) or _NAMES.setdefault(func, torch.overrides.resolve_name(func) or "?")
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in self.COPIES and self._names_device(name, args, kwargs):
            caller, via = self._caller()
            source = inputs[-1:] if name in ("torch.Tensor.copy_", "torch._foreach_copy_") else inputs[:1]
            from_host = not inputs or all(self.on_host(t) for t in source)  # tensor(data, device=...): host data
            if from_host and via:
                self.via_helper += 1
            elif from_host:
                self.bypassing.append((name, caller))
            for t in outputs:
                if via or not any(t is i for i in inputs):  # on the CPU .to returns its tensor: the helper's is sent
                    self._host.pop(id(t), None)
            return out
        if name in self.READS and inputs and not self.on_host(inputs[0]):
            self.reads.append((name, self._caller()[0]))
        if name in ("torch.Tensor.cpu", "torch.Tensor.numpy"):
            self._tag(outputs)
        elif all(self.on_host(t) for t in inputs) and not (not inputs and kwargs.get("device") is not None):
            self._tag(t for t in outputs if not any(t is i for i in inputs))  # in place: keeps its tag
        return out


@pytest.mark.parametrize("encoder, snr_gamma", [("cached", None), ("cached", 5.0), ("online", 5.0)])
def test_no_host_to_device_copy_of_the_training_loop_bypasses_to_device(assets, encoder, snr_gamma):
    """Every copy to the device in an epoch (micro-steps, clipping, optimizer, EMA, LR schedule) goes through
    to_device, whoever makes it: the noise schedule's table included (--snr_gamma reads it a second time)."""
    from accelerate import Accelerator

    import common.encoding as encoding
    import common.training as training
    from common.data import ImageTransform, load_training_data
    from common.models import load_sd_parts

    ds = load_training_data(assets["data"], None, "prompt")
    cfg = training.TrainConfig(learning_rate=1e-4, train_batch_size=5, seed=3, use_ema=True, snr_gamma=snr_gamma)
    parts = load_sd_parts(assets["sd"])
    make = encoding.CachedEncoder if encoder == "cached" else encoding.OnlineEncoder
    enc = make(parts, ImageTransform(32, center_crop=True, random_flip=True), "cpu", torch.float32)
    trainer = training.ChunkTrainer(Accelerator(cpu=True), parts, enc, cfg, 10)
    trainer.reset_chunk(0)
    enc.prepare(ds, (0, 10))  # the chunk's encoding: once per chunk, not per micro-step
    scheduler_tables = [v for v in vars(parts.noise_scheduler).values() if isinstance(v, torch.Tensor)]
    with HostDeviceTracker(host=scheduler_tables) as tracker:
        trainer.train_epoch(ds, (0, 10), 0, 0)
    micro_batches = 2
    assert sorted(set(tracker.bypassing)) == [], \
        f"host-to-device copies outside common.data.to_device: {sorted(set(tracker.bypassing))}"
    assert tracker.via_helper >= 6 * micro_batches  # the tracker does see the copies (to_device's own)
    assert [name for name, _ in tracker.reads] == ["torch.Tensor.tolist"]  # one host read: the epoch's losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_alphas_sent_with_the_draws_give_the_same_bits(prediction_type):
    """The trainer's alpha_bar values, looked up on the host and sent: the same noised latents, targets and Min-SNR
    loss, bit for bit, as looking them up in the scheduler's table where the timesteps are."""
    from diffusers import DDPMScheduler

    from common.training import alpha_bars, diffusion_loss, noisy_inputs

    sched = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    latents, noise, pred = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, (6,), generator=g)
    alphas = alpha_bars(sched, t)
    looked_up = noisy_inputs(latents, sched, noise, noise, t)
    sent = noisy_inputs(latents, sched, noise, noise, t, alphas)
    assert all(torch.equal(a, b) for a, b in zip(looked_up, sent))
    assert torch.equal(diffusion_loss(pred, sent[1], t, sched, 5.0), diffusion_loss(pred, sent[1], t, sched, 5.0,
                                                                                     alphas=alphas))


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
