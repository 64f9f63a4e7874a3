"""tools/unlearning/sa.py (Selective Amnesia) on the tiny model: its objective, its Fisher, what it trains, resume.

Runs are in-process (tools/unlearn.py's parse_args and main) and few: one run on generated data, one on those
images given as folders that is killed by the fault hook after step 5 and resumed; both end in the same bits.
"""

import os

import pytest
import torch

from common import faults, numerics
from common.data import encode_prompts
from tools import unlearn
from tools.unlearning import base, sa
from unlearn_helpers import card as _card, run as _run, weights as _weights, refused

CONCEPT, SURROGATE, REPLAY = "red circle", "blue square", ("green triangle", "yellow cross")
TRAIN_METHOD = "noxattn"  # a proper subset of the UNet: "only the trained parameters change" means something
COMMON = ["--method", "sa", "--concept", CONCEPT, "--fisher_samples", "2", "--fisher_timesteps", "4",
          "--iterations", "6", "--batch_size", "2", "--train_method", TRAIN_METHOD, "--probe_samples", "2",
          "--checkpoint_every", "4", "--ema_decay", "0.5", "--device", "cpu", "--quiet"]
SURROGATE_GEN = ["--surrogate", SURROGATE, "--surrogate_images", "3"]
REPLAY_GEN = ["--replay_prompts", *REPLAY, "--replay_images", "4", "--generation_steps", "2"]
GENERATE = SURROGATE_GEN + REPLAY_GEN


class Killed(Exception):
    """What the fault hook's SIGKILL becomes in this process."""


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """A: generated data, uninterrupted. B: A's images as folders, killed after step 5 (checkpoint at 4), resumed.

    Each in its own parent directory, so each computes its Fisher (B's resume reads the one B wrote)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("sa")
    a = _run([*COMMON, *GENERATE, "--model", assets["sd"], "--output_dir", str(root / "a" / "model")])
    b_out = str(root / "b" / "model")
    b_flags = [*COMMON, "--model", assets["sd"], "--output_dir", b_out,
               "--surrogate_data", os.path.join(a, base.DATA_DIR, "surrogate"),
               "--replay_data", os.path.join(a, base.DATA_DIR, "replay")]

    def kill(pid, sig):
        raise Killed

    mp.setenv("REVIVAL_FAULT", "update:5")
    mp.setattr(faults, "_counts", {})
    mp.setattr(faults.os, "kill", kill)
    try:
        with pytest.raises(Killed):
            _run(b_flags)
    finally:
        mp.undo()
    left = sorted(os.listdir(b_out))
    with pytest.raises(SystemExit):  # a checkpoint is never lost: a run without --resume is refused
        unlearn.parse_args(b_flags)
    _run([*b_flags, "--resume"])
    yield {"a": a, "b": b_out, "left": left, "root": root}


def test_same_seed_and_a_killed_then_resumed_run_give_the_same_bits(runs):
    assert runs["left"] == [base.CHECKPOINT_DIR]  # killed: only the checkpoint, no model
    a, b = _weights(runs["a"]), _weights(runs["b"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card_a, card_b = _card(runs["a"]), _card(runs["b"])
    assert card_b["training"] == {"checkpoint_every": 4, "resumed_from_step": 4}
    for key in ("loss", "loss_terms", "objective_on_probes", "trained_parameters"):
        assert card_a["results"][key] == card_b["results"][key], key
    assert not card_a["results"]["fisher"]["reused"] and card_b["results"]["fisher"]["reused"]  # B's resume read it
    assert not os.path.exists(os.path.join(runs["b"], base.CHECKPOINT_DIR))


def test_only_the_trained_parameters_change_and_the_card_says_so(runs, assets):
    from common.models import load_sd_parts

    unet = load_sd_parts(assets["sd"]).unet
    trained = set(sa.sa_trainable_names(unet, TRAIN_METHOD))
    names = {n for n, _ in unet.named_parameters()}
    assert trained and trained < names and not any("attn2" in n or n.startswith("conv_out") for n in trained)
    before, after = _weights(assets["sd"]), _weights(runs["a"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trained
    for part in ("text_encoder", "vae"):
        old, new = _weights(assets["sd"], part), _weights(runs["a"], part)
        assert all(torch.equal(old[k], new[k]) for k in old), part
    card = _card(runs["a"])
    assert set(card["changed_parameters"]["unet"]["per_tensor"]) == trained
    assert card["results"]["trained_parameters"]["tensors"] == len(trained)
    assert card["erase"] == [CONCEPT] and card["hyperparameters"]["surrogate"] == SURROGATE
    assert card["hyperparameters"]["fisher_timesteps"] == 4 and card["hyperparameters"]["resolution"] == 32
    data = card["data"]
    assert data["surrogate"]["images"] == 3 and data["surrogate"]["prompts"] == [SURROGATE]
    assert data["replay"]["images"] == 4 and data["replay"]["prompts"] == sorted(REPLAY)
    assert data["replay"]["generated"]["seed"] == 0 and data["surrogate"]["generated"]["seed"] == 1
    assert data["replay"]["generated"]["num_inference_steps"] == 2
    terms = card["results"]["loss_terms"]
    assert terms["ewc"]["first"] == 0 and terms["ewc"]["last"] > 0  # the penalty grows as the weights leave theta*
    fisher = card["results"]["fisher"]
    assert fisher["fisher_samples"] == 2 and fisher["fisher_timesteps"] == 4 and fisher["sum"] > 0
    assert os.path.dirname(fisher["file"]) == str(runs["root"] / "a")  # OUTPUT_DIR/..: a sibling run reuses it
    card_b = _card(runs["b"])  # the folders given: recorded as read, not generated
    assert card_b["data"]["replay"]["generated"] is None and card_b["data"]["replay"]["images"] == 4
    assert card_b["hyperparameters"]["surrogate"] is None


# ---- the objective and the Fisher on fixed inputs ---------------------------------


@pytest.fixture(scope="module")
def parts(assets):
    from common.models import load_sd_parts

    return load_sd_parts(assets["sd"])


def _data(parts, n_surrogate=3, n_replay=4) -> sa.Data:
    g = torch.Generator().manual_seed(0)
    ctx = encode_prompts(parts.tokenizer, parts.text_encoder, [CONCEPT, *REPLAY], "cpu").detach()
    shape = (4, 8, 8)
    return sa.Data(torch.randn((n_surrogate, *shape), generator=g), torch.full((n_surrogate, *shape), 0.1),
                   ctx[:1], torch.randn((n_replay, *shape), generator=g), torch.full((n_replay, *shape), 0.1),
                   ctx[1:], torch.tensor([0, 1, 0, 1][:n_replay]))


def test_the_loss_is_its_three_terms_and_falls_on_a_fixed_batch(parts):
    import copy

    unet = copy.deepcopy(parts.unet)
    names = sa.sa_trainable_names(unet, TRAIN_METHOD)
    from common.training import select_trainable

    select_trainable(unet, names)
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    anchor = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    batch = sa.make_batch(_data(parts), torch.tensor([0, 2]), torch.tensor([1, 3]), parts.noise_scheduler,
                          torch.Generator().manual_seed(2), "cpu")
    with torch.no_grad():  # off the anchor, so the EWC term is not zero
        for p in params.values():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    lam, gamma = 7.0, 0.5
    loss, terms = sa.sa_loss(unet, batch, params, anchor, fisher, lam, gamma)
    with torch.no_grad():
        pred = unet(batch.x_t, batch.timesteps, encoder_hidden_states=batch.context).sample
        err = ((pred - batch.target) ** 2).mean(dim=(1, 2, 3))
        ewc = sum(float((fisher[n] * (params[n] - anchor[n]) ** 2).sum()) for n in params)
    expected = err[:2].mean() + gamma * err[2:].mean() + lam * ewc
    assert terms["ewc"] > 0 and abs(terms["ewc"] - ewc) <= 1e-4 * ewc
    assert torch.isclose(loss, expected, rtol=1e-5), (float(loss), float(expected))
    optimizer = numerics.adamw(list(params.values()), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, _ = sa.sa_loss(unet, batch, params, anchor, fisher, lam, gamma)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("SA loss on one fixed batch:", [f"{v:.3f}" for v in losses])
    assert losses[-1] < 0.7 * losses[0]


def test_the_fisher_is_the_square_of_the_gradient_summed_over_timesteps(parts):
    """ddpm_fim.py: per image, (d/dtheta sum_t loss_t)^2, averaged over images; T/K scales a K-timestep sum."""
    import copy

    unet = copy.deepcopy(parts.unet).requires_grad_(True)
    data = _data(parts, n_replay=2)
    steps = sa.fisher_timesteps(2, 1000)
    assert steps == [250, 750] and sa.fisher_timesteps(1000, 1000) == list(range(1000))
    fisher = sa.fisher_diagonal(unet, data.replay_mean, data.replay_std, data.replay_context, parts.noise_scheduler,
                                steps, chunk=1, seed=3, device="cpu")
    expected = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
    for i in range(2):  # independently: each timestep's gradient on its own, then summed, scaled and squared
        g = base.step_generator(3, i, sa.FISHER_STREAM)
        z = data.replay_mean[i:i + 1] + data.replay_std[i:i + 1] * torch.randn((1, 4, 8, 8), generator=g)
        summed = {n: torch.zeros_like(p) for n, p in unet.named_parameters()}
        for t in steps:
            eps = torch.randn((1, 4, 8, 8), generator=g)
            x_t = parts.noise_scheduler.add_noise(z, eps, torch.tensor([t]))
            unet.zero_grad()
            pred = unet(x_t, torch.tensor([t]), encoder_hidden_states=data.replay_context[i:i + 1]).sample
            ((pred - eps) ** 2).mean().backward()
            for n, p in unet.named_parameters():
                summed[n] += p.grad
        for n in expected:
            expected[n] += (500.0 * summed[n]) ** 2 / 2
    for n, f in fisher.items():
        assert torch.allclose(f, expected[n], rtol=1e-3, atol=1e-6 * float(expected[n].abs().max())), n


def test_surrogate_images_are_captioned_with_the_concept_and_replay_images_with_their_own_prompts(runs, parts):
    data_dir = os.path.join(runs["a"], base.DATA_DIR)
    surrogate = base.load_image_set(os.path.join(data_dir, "surrogate"), "--surrogate_data")
    replay = base.load_image_set(os.path.join(data_dir, "replay"), "--replay_data")
    forget = [CONCEPT, "a " + CONCEPT]
    data = sa.build_data(parts, forget, surrogate, replay, 32, "cpu")
    emb = encode_prompts(parts.tokenizer, parts.text_encoder, [*forget, *replay.prompts], "cpu").detach()
    assert torch.equal(data.forget_context, emb[:2])
    assert torch.equal(data.replay_context[data.replay_prompt], emb[2:])
    assert data.surrogate_mean.shape == (3, 4, 8, 8) and data.replay_mean.shape == (4, 4, 8, 8)


def test_epoch_orders_visit_every_image_once_per_epoch():
    drawn = torch.cat([sa.epoch_indices(0, 2, 5, step, 2) for step in range(5)])  # 10 draws: 2 epochs of 5
    assert sorted(drawn[:5].tolist()) == list(range(5)) and sorted(drawn[5:].tolist()) == list(range(5))
    assert torch.equal(sa.epoch_indices(0, 2, 5, 3, 2), drawn[6:8])  # a pure function of the step


# ---- bad input: one line, exit 2, nothing written --------------------------------


@pytest.fixture(scope="module")
def other_model_fisher(runs, tmp_path_factory):
    """A's Fisher file with another model's weights digest in its header (what another base model writes)."""
    path = str(tmp_path_factory.mktemp("fisher") / "other.safetensors")
    meta = sa.read_fisher_metadata(_card(runs["a"])["results"]["fisher"]["file"])
    model = dict(meta["model"], weights_sha256="0" * 64)
    sa.save_fisher(path, {"x": torch.zeros(1)}, model, meta["settings"], meta["computed"])
    return path


@pytest.mark.parametrize("extra, message", [
    (["--surrogate_data", "{missing}", *REPLAY_GEN], "--surrogate_data {missing}: no such directory"),
    (["--replay_data", "{empty}", *SURROGATE_GEN], "--replay_data {empty}: no metadata.jsonl"),
    ([*GENERATE, "--fisher_file", "{other}"], "--fisher_file {other}: computed on another model (its UNet weights"),
    ([*GENERATE, "--fisher_file", "{a_fisher}", "--fisher_samples", "3"],
     "--fisher_file {a_fisher}: computed with other settings (fisher_samples 2)"),
    ([*GENERATE, "--ewc_lambda", "0"], "--ewc_lambda 0.0: must be > 0"),
    ([*GENERATE, "--ewc_lambda", "-5"], "--ewc_lambda -5.0: must be > 0"),
    ([*GENERATE, "--fisher_samples", "0"], "--fisher_samples 0: must be > 0"),
    ([*GENERATE, "--replay_images", "0"], "--replay_images 0: must be > 0"),
    ([*REPLAY_GEN, "--surrogate_images", "-1"], "--surrogate_images -1: must be > 0"),
    ([*GENERATE, "--fisher_samples", "9"], "--fisher_samples 9: at most the replay images (--replay_images is 4)"),
    ([*REPLAY_GEN, "--surrogate", " Red  Circle"], "--surrogate ' Red  Circle': is the concept's own prompt"),
    ([*REPLAY_GEN, "--forget_prompts", "a red circle", "--surrogate", "A red circle"],
     "--surrogate 'A red circle': is the concept's own prompt 'a red circle'"),
    (SURROGATE_GEN, "--replay_prompts (or --replay_prompts_file, --replay_data): required"),
    ([*GENERATE, "--train_method", "selfattn"], "--train_method selfattn: SA trains full, xattn, noxattn"),
    ([*GENERATE, "--ema_decay", "1"], "--ema_decay 1.0: must be >= 0 and < 1"),
    ([*GENERATE, "--eta", "2"], "--eta: not used by --method sa"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(extra, message, runs, other_model_fisher, assets,
                                                          tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    values = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "other": other_model_fisher,
              "a_fisher": _card(runs["a"])["results"]["fisher"]["file"]}
    out = tmp_path / "out"
    # Flags after COMMON override its values (argparse: the last one wins).
    refused([*COMMON, *[e.format(**values) for e in extra], "--model", assets["sd"], "--output_dir", str(out)],
            message.format(**values), capsys, out)


def test_a_fisher_file_of_this_model_is_accepted_before_the_model_loads(runs, assets, tmp_path):
    """The fingerprint read from the model's files is the one of the loaded UNet that wrote the file."""
    path = _card(runs["a"])["results"]["fisher"]["file"]
    request = unlearn.parse_args([*COMMON, *GENERATE, "--fisher_file", path, "--model", assets["sd"],
                                  "--output_dir", str(tmp_path / "o")])
    assert request.settings["fisher_file"] == path
