"""common/numerics.py: the pinned numeric environment gives the same bits whatever the machine-dependent knobs.

One CPU cannot stand in for another: what this machine can vary is what the
pin must override (a user's thread count, kernel level, MKL branch, oneDNN
ISA, the cores a process may use), and the route the pin takes into a
process (set in-process before torch loads, inherited by a subprocess,
through `accelerate launch`, by re-running a command that loaded torch first).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from common import numerics

# What differs from machine to machine, or from user to user, set against the pin.
HOSTILE = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AVX2",
           "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_DYNAMIC": "TRUE"}
PROBE_PINNED = ROOT / "tests" / "pinned" / "numerics_probe.json"
PRINT = "import json; from common import numerics; print(json.dumps([numerics.describe(), numerics.probe()]))"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in numerics.PIN}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _start(cmd, env, cwd=None):
    return subprocess.Popen(cmd, env=env, cwd=cwd or str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _result(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """The probe in five processes at once: pinned four ways (two of them under hostile knobs), unpinned once."""
    if numerics.unsupported_reason():
        pytest.skip(numerics.unsupported_reason())
    child = tmp_path_factory.mktemp("numerics") / "child.py"  # a script as the demo's launched scripts are
    child.write_text(PRINT + "\n")
    one_core = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    py = sys.executable
    procs = {
        # pin_process() in a clean process, before torch loads (the CLI route when torch is not imported yet)
        "in_process": _start([py, "-c", "from common import numerics; numerics.pin_process(); " + PRINT],
                             _clean_env()),
        # a subprocess given pinned_env() over hostile settings, on one core (the demo's children)
        "inherited_hostile": _start([*one_core, py, "-c", PRINT], numerics.pinned_env(_clean_env(**HOSTILE))),
        # torch loaded first, then pin_process(): the command re-runs itself under the pin (demo.py's route)
        "reexec_hostile": _start([py, "-c", "import torch; torch.ones(3).sum(); from common import numerics; "
                                            "numerics.pin_process(); " + PRINT], _clean_env(**HOSTILE)),
        # through `accelerate launch`, which sets OMP_NUM_THREADS itself when it is unset
        "accelerate": _start([py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                              "--mixed_precision", "no", "--dynamo_backend", "no", str(child)],
                             numerics.pinned_env(_clean_env(ACCELERATE_USE_CPU="true"))),
        # no pin, a lower kernel level: the probe must see the difference, or equal hashes prove nothing
        "unpinned_default_isa": _start([py, "-c", PRINT],
                                       _clean_env(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")),
    }
    return {name: _result(p) for name, p in procs.items()}


def test_pinned_probe_is_bit_identical_whatever_the_knobs(probes):
    ref_env, ref = probes["in_process"]
    assert ref_env["pinned"] and ref_env["torch_cpu_capability"] == "AVX2" and ref_env["torch_threads"] == 1
    for name in ("inherited_hostile", "reexec_hostile", "accelerate"):
        env, hashes = probes[name]
        assert env["pinned"] and env["pin"] == numerics.PIN, name
        assert (env["torch_cpu_capability"], env["torch_threads"]) == ("AVX2", numerics.THREADS), name
        assert hashes == ref, (name, [k for k in ref if hashes[k] != ref[k]])


def test_pinned_probe_matches_the_recorded_bits(probes):
    """The claim itself: any x86-64 AVX2 machine with the same library versions computes the recorded bits
    (recorded on the machine named in the file; on any other machine this test is the cross-machine check).
    REPIN=1 rewrites tests/pinned/numerics_probe.json after an intended change (a library upgrade, a new
    primitive): review and commit it."""
    env, hashes = probes["in_process"]
    versions = {k: env[k] for k in ("mkl", "onednn")}
    versions["torch"] = env["library_versions"]["torch"]
    if os.environ.get("REPIN"):
        PROBE_PINNED.write_text(json.dumps({"recorded_on": env["cpu_model"], "versions": versions,
                                            "probe": hashes}, indent=1) + "\n")
        pytest.skip(f"re-pinned {PROBE_PINNED}: review the diff and commit it")
    want = json.loads(PROBE_PINNED.read_text())
    if want["versions"] != versions:
        pytest.skip(f"recorded with {want['versions']}, this venv has {versions}")
    assert hashes == want["probe"], [k for k in hashes if hashes[k] != want["probe"].get(k)]


def test_unpinned_lower_isa_changes_the_probe(probes):
    env, hashes = probes["unpinned_default_isa"]
    assert not env["pinned"] and env["torch_cpu_capability"] == "DEFAULT"
    ref = probes["in_process"][1]
    assert set(hashes) == set(ref)
    differ = {k for k in ref if hashes[k] != ref[k]}
    # ATen's vectorised kernels, oneDNN's convolutions and MKL's branch each leave their mark.
    assert {"softmax", "group_norm", "conv3x3", "matmul_64x64x64", "train_steps"} <= differ, differ


def test_pin_after_torch_import_fails_loudly_without_reexec():
    code = ("import torch; torch.ones(3).sum(); from common import numerics; "
            "numerics.pin_process(reexec=False)")
    proc = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=str(ROOT), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "NumericsError" in proc.stderr and "after torch was imported" in proc.stderr


def test_pinned_start_but_threads_changed_fails(monkeypatch):
    import torch

    monkeypatch.setattr(numerics, "_startup_env", lambda: dict(numerics.PIN))
    monkeypatch.setattr(numerics, "unsupported_reason", lambda info=None: None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(numerics.THREADS + 1)
        with pytest.raises(numerics.NumericsError, match="thread"):
            numerics.pin_process(reexec=False)
    finally:
        torch.set_num_threads(before)


def test_pinned_env_overrides_and_leaves_os_environ_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    env = numerics.pinned_env()
    assert all(env[k] == v for k, v in numerics.PIN.items()) and numerics.is_pinned(env)
    assert os.environ["OMP_NUM_THREADS"] == "7" and not numerics.is_pinned()
    assert numerics.pinned_env({"A": "1"}) == {"A": "1", **numerics.PIN}
    assert not numerics.is_pinned({**numerics.PIN, "MKL_CBWR": "AVX2"})


def test_unsupported_cpus_are_named():
    assert numerics.unsupported_reason({"machine": "x86_64", "model": "X", "flags": {"avx2", "fma", "sse4_2"}}) is None
    reason = numerics.unsupported_reason({"machine": "x86_64", "model": "Old CPU", "flags": {"avx", "sse4_2"}})
    assert "Old CPU" in reason and "avx2, fma" in reason
    assert "aarch64" in numerics.unsupported_reason({"machine": "aarch64", "model": None, "flags": set()})


def test_unsupported_cpu_is_input_error_naming_the_opt_out(monkeypatch):
    from common.errors import InputError

    monkeypatch.setattr(numerics, "unsupported_reason", lambda info=None: "this CPU lacks avx2")
    with pytest.raises(InputError, match="PIN=0"):
        numerics.pin_process(reexec=False)


def test_describe_reports_what_was_set_or_read_outside_it(probes):
    """describe() of a child started with a lower kernel level and no pin, against what the test set itself and
    reads itself (the CPU model line of /proc/cpuinfo, this interpreter's torch), not against describe's own calls."""
    import torch

    d, _ = probes["unpinned_default_isa"]
    assert d["pinned"] is False and d["torch_cpu_capability"] == "DEFAULT"
    assert d["pin"] == {**{k: None for k in numerics.PIN}, "ATEN_CPU_CAPABILITY": "default",
                        "ONEDNN_MAX_CPU_ISA": "SSE41"}  # _clean_env: the pin's variables unset, then these two
    assert d["library_versions"]["torch"] == torch.__version__.split("+")[0] and d["cpu_count"] == os.cpu_count()
    if os.path.isfile("/proc/cpuinfo") and d["machine"] == "x86_64":
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        assert d["cpu_model"] == model and "avx2" in d["cpu_isa"]
    assert d["blas"] and d["onednn"]
    json.dumps(d)  # goes into card.json and config.json


def test_same_pin(monkeypatch):
    pinned = {"pinned": True, "pin": dict(numerics.PIN)}
    unpinned = {"pinned": False, "pin": {k: None for k in numerics.PIN}}
    for k in numerics.PIN:
        monkeypatch.delenv(k, raising=False)
    assert numerics.same_pin(unpinned) and numerics.same_pin(None) and not numerics.same_pin(pinned)
    for k, v in numerics.PIN.items():
        monkeypatch.setenv(k, v)
    assert numerics.same_pin(pinned) and not numerics.same_pin(unpinned) and not numerics.same_pin(None)
    assert not numerics.same_pin({"pinned": True, "pin": {**numerics.PIN, "OMP_NUM_THREADS": "2"}})


def test_world_built_unpinned_is_rebuilt_under_the_pin(tmp_path, monkeypatch):
    from tools import toy_world as tw
    from tools.toy_world import build

    out = tmp_path / "world"
    out.mkdir()
    card = {"config": tw.world_config(0, "reduced"), "numeric_environment": {"pinned": False, "pin": {}},
            "targets": {}, "figures": {"models": {}}, "timings_seconds": {"total": 1}, "target_concept": "x"}
    (out / tw.CARD_FILE).write_text(json.dumps(card))
    built = []

    def fake_build(root, config, log, final_root=None, weights_dir=None):
        built.append(root)
        new = {**card, "numeric_environment": numerics.describe()}
        with open(os.path.join(root, tw.CARD_FILE), "w") as f:
            json.dump(new, f)
        return new

    monkeypatch.setattr(build, "_build", fake_build)
    for k in numerics.PIN:
        monkeypatch.delenv(k, raising=False)
    tw.build_toy_world(str(out), seed=0, scale="reduced", log=lambda *_: None)
    assert built == []  # unpinned process, unpinned card: reused
    for k, v in numerics.PIN.items():
        monkeypatch.setenv(k, v)
    tw.build_toy_world(str(out), seed=0, scale="reduced", log=lambda *_: None)
    assert len(built) == 1  # pinned process, unpinned card: rebuilt
    assert json.loads((out / tw.CARD_FILE).read_text())["numeric_environment"]["pinned"] is True
    tw.build_toy_world(str(out), seed=0, scale="reduced", log=lambda *_: None)
    assert len(built) == 1  # and the pinned card is reused by a pinned process


def test_demo_pin_switches():
    from tools import demo
    from tools import build_toy_world

    assert demo.parse_args([]).no_pin is False and demo.parse_args(["--no_pin"]).no_pin is True
    assert build_toy_world.parse_args(["--no_pin"]).no_pin is True
    if shutil.which("make"):
        # Under `make test` the outer make's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines: drop them.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

        def demo_line(*extra):
            out = subprocess.run(["make", "-n", *extra], cwd=str(ROOT), capture_output=True, text=True, env=env)
            return next(line for line in out.stdout.splitlines() if "tools/demo.py" in line)

        for target in ("demo", "demo-seeds"):
            assert "--no_pin" not in demo_line(target), target
            assert "--no_pin" in demo_line(target, "PIN=0"), target
