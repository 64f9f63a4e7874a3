"""Helpers of the unlearning tests (tests/test_unlearn*.py): a method run in-process, its card, its weights."""

import glob
import json
import os

import torch
from safetensors.torch import load_file

from tools import unlearn


def run(argv) -> str:
    """tools/unlearn.py in this process (parse, then main); the output directory."""
    request = unlearn.parse_args(argv)
    unlearn.main(request)
    return request.output_dir


def card(out: str) -> dict:
    """The unlearning card a run wrote."""
    with open(os.path.join(out, unlearn.CARD_FILE)) as f:
        return json.load(f)


def weights(pipeline_dir: str, part: str = "unet") -> dict:
    """Every tensor of one part of a pipeline directory."""
    out = {}
    for f in sorted(glob.glob(os.path.join(pipeline_dir, part, "*.safetensors"))):
        out.update(load_file(f))
    assert out, f"no safetensors under {pipeline_dir}/{part}"
    return out


def changed_tensors(a: dict, b: dict) -> set:
    """Names of the tensors that differ between two state dicts of the same keys."""
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def changed(base: str, out: str, part: str = "unet") -> set:
    """Names of the tensors of ``part`` that a run changed."""
    return changed_tensors(weights(base, part), weights(out, part))


class Killed(Exception):
    """What a fault hook's kill raises in the test's own process (stop_at)."""


def stop_at(monkeypatch, fault: str) -> None:
    """REVIVAL_FAULT=``fault`` (e.g. "update:3"), its kill raising Killed in this process: an in-process run stops where
    a SIGKILL would have killed it; ``monkeypatch.delenv("REVIVAL_FAULT")`` lets the next run go on."""
    import types

    from common import faults

    def kill(pid, sig):
        raise Killed

    monkeypatch.setenv("REVIVAL_FAULT", fault)
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setattr(faults, "os", types.SimpleNamespace(environ=os.environ, getpid=os.getpid, kill=kill))


def refused(argv, message: str, capsys, out=None) -> None:
    """tools/unlearn.py refuses ``argv`` at parse time: exit 2, one line of stderr holding ``message``, and (``out``
    given) nothing written there."""
    import pytest

    with pytest.raises(SystemExit) as err:
        unlearn.parse_args(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert out is None or not os.path.exists(out)


def stop_and_resume(monkeypatch, flags, fault: str = "update:3", inspect=None) -> str:
    """A run stopped by ``fault`` (leaving only its checkpoint folder; ``inspect(out)`` looks at it), then the same
    flags with --resume to the end; the output directory."""
    import pytest

    out = flags[flags.index("--output_dir") + 1]
    stop_at(monkeypatch, fault)
    with pytest.raises(Killed):
        run(flags)
    assert os.listdir(out) == ["unlearn_checkpoint"]
    if inspect is not None:
        inspect(out)
    monkeypatch.delenv("REVIVAL_FAULT")
    run([*flags, "--resume"])
    return out
