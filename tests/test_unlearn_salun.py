"""SalUn (tools/unlearning/salun.py) on the tiny model: the mask, the losses, what trains, resume, the card, bad input.

Mechanical properties only: the saliency gradient is the published
forgetting loss's, the mask holds exactly the largest share of it, only
masked entries of the trained parameter set move, both losses fall on fixed
examples, a seed repeats its bits (the mask's too), a saved mask is reused,
a run killed mid-way and resumed ends on the uninterrupted run's weights.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import faults
from tools import tiny, unlearn
from tools.unlearning import base, salun
from unlearn_helpers import card as _card, run as _run, weights as _weights, refused

CONCEPT, OTHER = "a red circle", "a blue square"
FORGET_ROWS, RETAIN_ROWS = 6, 8  # batch 2: 3 steps per epoch


@pytest.fixture(scope="module")
def folders(assets, tmp_path_factory):
    """A forget imagefolder (red circles) and a retain one (blue squares), cut from the tiny data set."""
    from PIL import Image

    root = tmp_path_factory.mktemp("salun_data")
    with open(os.path.join(assets["data"], "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    out = {}
    for role, prompt, n in (("forget", CONCEPT, FORGET_ROWS), ("retain", OTHER, RETAIN_ROWS)):
        picked = [r for r in rows if r["prompt"] == prompt][:n]
        out[role] = tiny.write_caption_folder(str(root / role), [
            (Image.open(os.path.join(assets["data"], r["file_name"])).convert("RGB"), r["prompt"]) for r in picked])
    return out


def _flags(assets, folders, out, *extra):
    return ["--method", "salun", "--concept", CONCEPT, "--model", assets["sd"], "--output_dir", str(out),
            "--forget_data", folders["forget"], "--retain_data", folders["retain"], "--epochs", "2",
            "--batch_size", "2", "--learning_rate", "1e-3", "--checkpoint_every", "2", "--device", "cpu", "--quiet",
            *extra]


@pytest.fixture(scope="module")
def salun_out(assets, folders, tmp_path_factory):
    """The reference run: 6 steps, a checkpoint every 2 (removed at the end)."""
    return _run(_flags(assets, folders, tmp_path_factory.mktemp("salun") / "model"))


@pytest.fixture(scope="module")
def unet_and_scheduler(assets):
    """The tiny base UNet and its noise schedule; text embeddings in the unit tests are random (no text encoder)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets["sd"], subfolder="unet").requires_grad_(False)
    return unet, DDPMScheduler.from_pretrained(assets["sd"], subfolder="scheduler")


def _embeddings(unet, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(seed))


# ---- the mask -------------------------------------------------------------------

def test_top_fraction_mask_keeps_the_largest_gradients_ties_in_order():
    grads = {"a": torch.tensor([3.0, -1.0, 2.0, 2.0]), "b": torch.tensor([[-5.0, 2.0], [0.0, 1.0]])}
    # |g|: a 3 1 2 2, b 5 2 0 1; the top 4 of 8 are 5, 3 and two of the three 2s: a's, the first in order.
    mask = salun.top_fraction_mask(grads, 0.5)
    assert mask["a"].tolist() == [True, False, True, True] and mask["b"].tolist() == [[True, False], [False, False]]
    assert all(m.all() for m in salun.top_fraction_mask(grads, 1.0).values())
    tiny_share = salun.top_fraction_mask(grads, 1e-9)  # int(8 * 1e-9) = 0: still the largest one
    assert sum(int(m.sum()) for m in tiny_share.values()) == 1 and bool(tiny_share["b"][0, 0])
    g = torch.Generator().manual_seed(0)
    grads = {"x": torch.randn(37, 5, generator=g), "y": torch.randn(300, generator=g) * 1e-3}
    flat = torch.cat([t.abs().flatten() for t in grads.values()])
    for ratio in (0.1, 0.5, 0.93):
        mask = salun.top_fraction_mask(grads, ratio)
        k = int(flat.numel() * ratio)
        picked = torch.cat([mask[n].flatten() for n in grads])
        assert int(picked.sum()) == k and flat[picked].min() >= flat[~picked].max()


def test_saliency_gradient_is_the_guided_forgetting_loss_summed_over_batches(unet_and_scheduler):
    """generate_mask.py's loss, -MSE(noise, (1 + w) eps(c) - w eps('')), summed over the forget set's batches."""
    unet, sched = unet_and_scheduler
    emb = _embeddings(unet, 2, 0)
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, 4, 8, 8, generator=g) * 0.1
    cond = emb[0:1].expand(3, -1, -1)
    w, seed = 7.5, 11
    got = salun.saliency_gradients(unet, sched, mean, std, cond, emb[1:2], 2, w, seed, "cpu")
    params = dict(unet.named_parameters())
    names = ["conv_in.weight", next(n for n in params if n.endswith("attn2.to_k.weight"))]
    expected = [torch.zeros_like(params[n]) for n in names]
    for n in names:
        params[n].requires_grad_(True)
    try:
        for b in (0, 2):  # two batches: rows 0-1 and row 2
            gen = base.step_generator(seed, b // 2, salun.MASK_STREAM)
            z = mean[b:b + 2] + std[b:b + 2] * torch.randn(mean[b:b + 2].shape, generator=gen)
            x_t, t, noise = base.noised(sched, z, gen)
            n = z.shape[0]
            eps_c = unet(x_t, t, encoder_hidden_states=emb[0:1].expand(n, -1, -1)).sample
            eps_u = unet(x_t, t, encoder_hidden_states=emb[1:2].expand(n, -1, -1)).sample
            loss = -F.mse_loss((1 + w) * eps_c - w * eps_u, noise)
            for e, grad in zip(expected, torch.autograd.grad(loss, [params[n] for n in names])):
                e += grad
    finally:
        for n in names:
            params[n].requires_grad_(False)
    assert got.keys() == params.keys()
    for n, e in zip(names, expected):
        assert torch.allclose(got[n], e, rtol=1e-4, atol=1e-9) and e.abs().sum() > 0, n
    assert not any(p.requires_grad for p in unet.parameters())  # left as they were


def test_salun_losses_pull_the_concept_to_the_detached_pseudo_prediction(unet_and_scheduler):
    unet, _ = unet_and_scheduler
    emb = _embeddings(unet, 2, 1)
    g = torch.Generator().manual_seed(2)
    fx, rx, target = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    ft, rt = torch.tensor([100, 700]), torch.tensor([300, 900])
    c, p = emb[0:1].expand(2, -1, -1), emb[1:2].expand(2, -1, -1)
    param = dict(unet.named_parameters())["conv_in.weight"]
    param.requires_grad_(True)
    try:
        total, forget, retain = salun.salun_losses(unet, fx, ft, c, p, rx, rt, p, target, alpha=0.3)
        got = torch.autograd.grad(total, param)[0]
        eps = lambda x, t, ctx: unet(x, t, encoder_hidden_states=ctx).sample  # noqa: E731
        want_forget = F.mse_loss(eps(fx, ft, c), eps(fx, ft, p).detach())
        want_retain = F.mse_loss(eps(rx, rt, p), target)
        want = torch.autograd.grad(want_forget + 0.3 * want_retain, param)[0]
    finally:
        param.requires_grad_(False)
    assert torch.allclose(forget, want_forget) and torch.allclose(retain, want_retain)
    assert torch.allclose(total, forget + 0.3 * retain)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def test_retain_batches_restart_each_epoch_and_reshuffle_each_pass():
    first = [salun.retain_batch(5, 2, 0, 0, b).tolist() for b in range(6)]
    assert [len(b) for b in first] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(first[:3], [])) == list(range(5)) and sorted(sum(first[3:], [])) == list(range(5))
    assert first[:3] != first[3:]  # a new pass, a new order
    assert [salun.retain_batch(5, 2, 0, 1, b).tolist() for b in range(3)] != first[:3]  # a new epoch, a new order


# ---- the reference run: what trains, the objective, the card ----------------------

def test_only_masked_entries_of_the_unet_change_and_the_losses_fall(assets, salun_out):
    base_w, out_w = _weights(assets["sd"]), _weights(salun_out)
    mask = load_file(os.path.join(salun_out, salun.MASK_FILE))
    assert mask.keys() == base_w.keys() and all(m.dtype == torch.bool for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == int(total * 0.5)
    moved = 0
    for name, w0 in base_w.items():
        changed = out_w[name] != w0
        assert not bool((changed & ~mask[name]).any()), name  # nothing outside the mask moves
        moved += int(changed.sum())
    assert moved > 0.9 * int(total * 0.5)  # Adam moves nearly every masked entry
    for part in ("vae", "text_encoder"):
        a, b = _weights(assets["sd"], part), _weights(salun_out, part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    probe = _card(salun_out)["results"]["objective_on_probes"]
    print("SalUn probes before/after:", probe["before"], probe["after"])
    assert probe["after"]["forget"] < 0.6 * probe["before"]["forget"]
    assert probe["after"]["retain"] < probe["before"]["retain"]


def test_the_card_records_the_data_the_mask_and_the_changed_parameters(assets, folders, salun_out):
    card = _card(salun_out)
    assert card["method"] == "salun" and card["erase"] == [CONCEPT] and card["code"] == salun.CODE
    for role, n, prompt in (("forget", FORGET_ROWS, CONCEPT), ("retain", RETAIN_ROWS, OTHER)):
        data = card["data"][role]
        assert data == {"folder": os.path.abspath(folders[role]), "images": n, "prompts": [prompt],
                        "generated": None}, role
    hyper = card["hyperparameters"]
    assert hyper["pseudo_prompt"] == [OTHER] and hyper["mask_ratio"] == 0.5 and hyper["alpha"] == 0.5
    assert hyper["resolution"] == 32 and hyper["epochs"] == 2
    results = card["results"]
    assert results["mask"]["source"] == "computed" and results["mask"]["share"] == 0.5
    assert results["mask"]["file"] == os.path.join(os.path.abspath(salun_out), salun.MASK_FILE)
    assert results["steps"] == {"epochs": 2, "per_epoch": 3, "total": 6}
    assert len({results["loss"]["first"], results["forget_loss"]["first"], results["retain_loss"]["first"]}) == 3
    changed = card["changed_parameters"]["unet"]
    base_w, out_w = _weights(assets["sd"]), _weights(salun_out)
    assert set(changed["per_tensor"]) == {k for k in base_w if not torch.equal(base_w[k], out_w[k])}
    assert 0 < changed["tensors"] <= results["mask"]["tensors_with_selected"]
    assert card["training"] == {"checkpoint_every": 2, "resumed_from_step": None}
    assert not os.path.exists(os.path.join(salun_out, base.CHECKPOINT_DIR))


# ---- the same bits: a seed, a kill and --resume ------------------------------------

class _Killed(BaseException):
    pass


def test_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(assets, folders, salun_out, tmp_path,
                                                                          monkeypatch, capsys):
    """The same seed twice, once killed and resumed: REVIVAL_FAULT=update:3 (killed after step 3; the checkpoint is
    step 2's; in-process, the kill raises), a rerun without --resume refused, then --resume: the reference run's
    mask (computed anew from the seed before the kill) and its UNet bits and results."""
    out = tmp_path / "killed"

    def kill(pid, sig):
        raise _Killed()

    monkeypatch.setattr(faults, "os", SimpleNamespace(kill=kill, getpid=os.getpid, environ=os.environ))
    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv("REVIVAL_FAULT", "update:3")
    with pytest.raises(_Killed):
        _run(_flags(assets, folders, out))
    monkeypatch.delenv("REVIVAL_FAULT")
    assert sorted(os.listdir(out)) == [salun.MASK_FILE, base.CHECKPOINT_DIR]
    with pytest.raises(SystemExit) as err:
        unlearn.parse_args(_flags(assets, folders, out))
    assert err.value.code == 2 and "holds the checkpoint of an unfinished run (step 2 of 6)" in capsys.readouterr().err
    _run(_flags(assets, folders, out, "--resume"))
    a, b = _weights(salun_out), _weights(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_file(os.path.join(salun_out, salun.MASK_FILE)), load_file(str(out / salun.MASK_FILE))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # the mask itself is a function of the seed
    ca, cb = _card(salun_out), _card(str(out))
    assert cb["training"] == {"checkpoint_every": 2, "resumed_from_step": 2}
    ra, rb = ca["results"], cb["results"]
    for key in ("loss", "forget_loss", "retain_loss", "objective_on_probes", "steps", "trained_parameters"):
        assert ra[key] == rb[key], key


# ---- generated data, a saved mask, cross-attention only ------------------------------

def test_generated_data_a_saved_mask_and_xattn_train_only_its_cross_attention_entries(assets, salun_out, tmp_path):
    out = str(tmp_path / "gen")
    saved = os.path.join(salun_out, salun.MASK_FILE)
    _run(["--method", "salun", "--concept", CONCEPT, "--model", assets["sd"], "--output_dir", out,
          "--retain_prompts", OTHER, "a green triangle", "--forget_images", "2", "--retain_images", "2",
          "--generation_steps", "2", "--epochs", "1", "--batch_size", "2", "--learning_rate", "1e-3",
          "--train_method", "xattn", "--mask", saved, "--probe_samples", "0", "--concept_probe", "0",
          "--device", "cpu", "--quiet"])
    card = _card(out)
    assert card["results"]["mask"]["source"] == saved and card["hyperparameters"]["mask"] == saved
    for role, prompts in (("forget", [CONCEPT]), ("retain", [OTHER, "a green triangle"])):
        data = card["data"][role]
        assert data["folder"] == os.path.join(os.path.abspath(out), base.DATA_DIR, role) and data["images"] == 2
        assert data["prompts"] == sorted(prompts) and data["generated"]["prompts"] == prompts
        assert data["generated"]["num_inference_steps"] == 2
        assert base.load_image_set(data["folder"], "--x").prompts == tuple(prompts[j % len(prompts)] for j in range(2))
    assert card["hyperparameters"]["pseudo_prompt"] == [OTHER]  # the retain set's first prompt
    mask = load_file(saved)
    copy = load_file(os.path.join(out, salun.MASK_FILE))  # written beside this model too
    assert all(torch.equal(mask[k], copy[k]) for k in mask)
    base_w, out_w = _weights(assets["sd"]), _weights(out)
    changed = {k for k in base_w if not torch.equal(base_w[k], out_w[k])}
    assert changed and all("attn2" in k for k in changed)
    assert all(not bool(((out_w[k] != base_w[k]) & ~mask[k]).any()) for k in changed)
    assert card["results"]["trained_parameters"]["masked_in"] == sum(int(mask[k].sum()) for k in mask if "attn2" in k)


# ---- bad input --------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_masks(assets, salun_out, tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    good = load_file(os.path.join(salun_out, salun.MASK_FILE))
    name = sorted(good)[0]
    shaped = dict(good)
    shaped[name] = torch.zeros(3, 3, dtype=torch.bool)
    save_file(shaped, str(root / "shape.safetensors"))
    fewer = dict(good)
    del fewer[name]
    save_file(fewer, str(root / "fewer.safetensors"))
    (root / "junk.safetensors").write_bytes(b"not a safetensors file")
    return {"shape": str(root / "shape.safetensors"), "fewer": str(root / "fewer.safetensors"),
            "junk": str(root / "junk.safetensors"), "name": name}


@pytest.mark.parametrize("extra, message", [
    (["--forget_data", "{missing}"], "--forget_data {missing}: no such directory"),
    (["--retain_data", "{empty}"], "--retain_data {empty}: no metadata.jsonl"),
    (["--mask_ratio", "0"], "--mask_ratio 0.0: must be in (0, 1]"),
    (["--mask_ratio", "1.5"], "--mask_ratio 1.5: must be in (0, 1]"),
    (["--mask_ratio", "nan"], "--mask_ratio nan: must be in (0, 1]"),
    (["--mask", "{missing}"], "--mask {missing}: no such file"),
    (["--mask", "{junk}"], "--mask {junk}: not a safetensors file"),
    (["--mask", "{shape}"], "its tensors do not match this model's UNet: 1 of another shape (e.g. {name}: [3, 3]"),
    (["--mask", "{fewer}"], "its tensors do not match this model's UNet: 1 UNet tensors missing (e.g. {name})"),
    (["--no_retain"], "--retain_data or --retain_prompts: SalUn needs a retain set"),
    (["--pseudo_prompt", "A Red Circle"], "--pseudo_prompt 'A Red Circle': is the concept itself"),
    (["--train_method", "attn"], "--train_method attn: must be one of full, xattn"),
    (["--forget_prompts", "x"], "--forget_prompts: not with --forget_data"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--lamb", "0.1"], "--lamb: not used by --method salun (a flag of uce, mace)"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(extra, message, assets, folders, bad_masks, tmp_path,
                                                            capsys):
    (tmp_path / "empty").mkdir()
    names = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), **bad_masks}
    out = tmp_path / "out"
    argv = _flags(assets, folders, out)
    if extra == ["--no_retain"]:
        i = argv.index("--retain_data")
        argv, extra = argv[:i] + argv[i + 2:], []
    refused([*argv, *[e.format(**names) for e in extra]], message.format(**names), capsys, out)
