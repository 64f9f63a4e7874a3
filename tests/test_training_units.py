import argparse

import pytest
import torch

from common.cli import str2bool
from common.training import diffusion_loss, select_trainable


class _Sched:
    """Stand-in scheduler with alphas_cumprod for compute_snr."""

    def __init__(self, prediction_type="epsilon"):
        self.alphas_cumprod = torch.tensor([0.99, 0.5, 0.01])
        self.config = argparse.Namespace(prediction_type=prediction_type)


def test_plain_mse_and_min_snr_weights_by_hand():
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]]])  # per-sample MSE: 1.0 and 2.0
    t = torch.tensor([0, 2])
    assert float(diffusion_loss(pred, target, t, _Sched(), None)) == pytest.approx(1.5)
    # snr = a/(1-a): 99 and 0.0101..; min(snr, 5)/snr: 5/99 and 1.
    snr = [0.99 / 0.01, 0.01 / 0.99]
    want = (1.0 * min(snr[0], 5) / snr[0] + 2.0 * min(snr[1], 5) / snr[1]) / 2
    assert float(diffusion_loss(pred, target, t, _Sched(), 5.0)) == pytest.approx(want, rel=1e-5)
    want_v = (1.0 * min(snr[0], 5) / (snr[0] + 1) + 2.0 * min(snr[1], 5) / (snr[1] + 1)) / 2
    assert float(diffusion_loss(pred, target, t, _Sched("v_prediction"), 5.0)) == pytest.approx(want_v, rel=1e-5)
    # Sample weights give a weighted sum (the cross-process share of a global batch).
    w = torch.tensor([0.25, 0.25])
    assert float(diffusion_loss(pred, target, t, _Sched(), None, w)) == pytest.approx(0.75)


def test_xattn_trains_exactly_the_cross_attention_keys_and_values(assets):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets["sd"], subfolder="unet")
    names = [n for n, p in unet.named_parameters()]
    chosen = select_trainable(unet, "xattn")
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    # The tiny UNet has 4 transformer blocks, each with to_k and to_v weights (no bias): the published set, not
    # every attn2 parameter (to_q and to_out stay frozen).
    want = {n for n in names if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert trained == want and len(chosen) == len(want) == 8
    assert {n for n in names if "attn2.to_q" in n or "attn2.to_out" in n}.isdisjoint(trained)
    assert len(select_trainable(unet, "full")) == len(names)


@pytest.mark.parametrize("text, value", [("True", True), ("False", False), ("false", False), ("0", False),
                                         ("yes", True), ("1", True)])
def test_str2bool(text, value):
    assert str2bool(text) is value


def test_str2bool_rejects_garbage():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_append_after_a_torn_last_line_keeps_every_record(tmp_path):
    """A kill mid-write leaves half a line; the resumed run's next record must not be glued onto it."""
    from common.results import append_jsonl, read_jsonl

    path = str(tmp_path / "results.jsonl")
    append_jsonl(path, {"case": 0})
    with open(path, "a") as f:
        f.write('{"case": 1, "sco')  # torn by the kill
    assert read_jsonl(path) == [{"case": 0}]
    append_jsonl(path, {"case": 1})
    append_jsonl(path, {"case": 2})
    assert read_jsonl(path) == [{"case": 0}, {"case": 1}, {"case": 2}]
    torn_only = str(tmp_path / "torn.jsonl")
    with open(torn_only, "w") as f:
        f.write('{"a": ')
    append_jsonl(torn_only, {"a": 1})
    assert read_jsonl(torn_only) == [{"a": 1}]
