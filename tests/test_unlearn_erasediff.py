"""EraseDiff (tools/unlearning/erasediff.py) on the tiny model: the losses, the step, what trains, resume, the card.

Mechanical properties only: the forget loss pulls the prediction to uniform noise (or a pseudo prompt's
prediction), the retain loss is the DDPM loss, the outer objective is L_r + lambda (L_f - reference), the inner
steps leave the parameters where they were (and their moments in Adam), only the --train_method set moves, the
objective falls on fixed batches, a seed repeats its bits, a run killed mid-way and resumed ends on the
uninterrupted run's weights, and bad input stops with one line before anything is written.
"""

import copy
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common import faults, numerics
from common.data import encode_prompts
from tools import unlearn
from tools.unlearning import base, erasediff
from unlearn_helpers import card as _card, changed_tensors as _changed, run as _run, weights as _weights, refused

CONCEPT, OTHER = "red circle", "blue square"
STEPS, EVERY, KILL_AFTER = 4, 2, 3  # killed after step 3: resumed from the checkpoint of step 2


def _flags(assets, out, *extra):
    return ["--method", "erasediff", "--concept", CONCEPT, "--model", assets["sd"], "--output_dir", str(out),
            "--iterations", str(STEPS), "--inner_steps", "2", "--batch_size", "2", "--learning_rate", "1e-3",
            "--probe_samples", "2", "--checkpoint_every", str(EVERY), "--concept_probe", "2", "--device", "cpu",
            "--quiet", *extra]


class Killed(Exception):
    """What the fault hook's SIGKILL becomes in-process."""


@pytest.fixture(scope="module")
def runs(assets, base_parts, tmp_path_factory):
    """generated: the reference run, on data the base model generates; killed: the same seed on those images read
    back as folders, killed after step 3 (REVIVAL_FAULT=update:3, the hook's SIGKILL turned into an exception);
    resumed: it, continued with --resume."""
    root = tmp_path_factory.mktemp("erasediff")
    # Each run gets the loaded model with a copy of its UNet (the only part EraseDiff edits): loading the tokenizer
    # again would take ~1 s a run.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "load_parts",
                   lambda model: dataclasses.replace(base_parts, unet=copy.deepcopy(base_parts.unet)))
        return _runs(assets, root)


def _runs(assets, root) -> dict:
    generated = _run(_flags(assets, root / "generated", "--retain_prompts", OTHER, "--forget_images", "4",
                            "--retain_images", "4", "--generation_steps", "2"))
    data = os.path.join(generated, base.DATA_DIR)
    flags = _flags(assets, root / "killed", "--forget_data", os.path.join(data, "forget"),
                   "--retain_data", os.path.join(data, "retain"))
    killed = str(root / "killed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REVIVAL_FAULT", f"update:{KILL_AFTER}")
        mp.setattr(faults, "_counts", {})
        mp.setattr(faults, "os", SimpleNamespace(environ=os.environ, getpid=os.getpid,
                                                 kill=lambda pid, sig: (_ for _ in ()).throw(Killed())))
        with pytest.raises(Killed):
            _run(flags)
    left = sorted(os.listdir(killed))
    with pytest.raises(SystemExit) as refused:
        unlearn.parse_args(flags)
    resumed = _run(flags + ["--resume"])
    return {"generated": generated, "resumed": resumed, "left_by_kill": left,
            "refused_without_resume": refused.value.code}


@pytest.fixture(scope="module")
def base_parts(assets):
    from common.models import load_sd_parts

    return load_sd_parts(assets["sd"])


# ---- what trains ------------------------------------------------------------------

def test_parameter_sets_follow_their_train_methods(base_parts):
    names = {n for n, _ in base_parts.unet.named_parameters()}
    sets = {m: set(erasediff.trainable_names(base_parts.unet, m)) for m in erasediff.TRAIN_METHODS}
    time_out = {n for n in names if n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))}
    xattn = {n for n in names if "attn2" in n}
    assert time_out and xattn and sets["full"] == names and sets["xattn"] == xattn
    assert sets["noxattn"] == names - xattn - time_out and sets["notime"] == names - time_out
    assert sets["selfattn"] == {n for n in names if "attn1" in n}
    assert any("time_emb_proj" in n for n in sets["noxattn"])  # the resnets' own time projections do train
    assert not sets["xlayer"] and not sets["selflayer"]  # SD-1.x blocks the tiny UNet does not have
    sd1 = ["up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight",
           "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
           "up_blocks.2.attentions.2.transformer_blocks.0.attn1.to_q.weight",
           "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
           "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight"]
    fake = SimpleNamespace(named_parameters=lambda: [(n, None) for n in sd1])
    assert erasediff.trainable_names(fake, "xlayer") == sd1[:1]
    assert erasediff.trainable_names(fake, "selflayer") == sd1[3:4]


def test_only_the_train_method_set_changes(assets, runs, base_parts):
    before = _weights(assets["sd"])
    changed = _changed(before, _weights(runs["generated"]))
    trained = set(erasediff.trainable_names(base_parts.unet, "noxattn"))
    assert changed and changed <= trained and "conv_in.weight" in changed
    for part in ("text_encoder", "vae"):
        assert not _changed(_weights(assets["sd"], part), _weights(runs["generated"], part)), part
    card = _card(runs["generated"])
    assert set(card["changed_parameters"]["unet"]["per_tensor"]) == changed
    assert card["results"]["trained_parameters"]["tensors"] == len(trained)


# ---- the losses and the step --------------------------------------------------------

def test_losses_targets_and_outer_objective(base_parts):
    unet, sched = base_parts.unet.eval(), base_parts.noise_scheduler
    cond, pseudo = encode_prompts(base_parts.tokenizer, base_parts.text_encoder, [CONCEPT, OTHER], "cpu").chunk(2)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = cond.expand(2, -1, -1)
    with torch.no_grad():
        got_f = erasediff.forget_loss(unet, sched, z, c, torch.Generator().manual_seed(1))
        got_p = erasediff.forget_loss(unet, sched, z, c, torch.Generator().manual_seed(1), "prompt", pseudo)
        got_r = erasediff.retain_loss(unet, sched, z, c, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        x_t, t, eps = base.noised(sched, z, g)  # the same draws, in the same order
        uniform = torch.rand(z.shape, generator=g)
        pred = unet(x_t, t, encoder_hidden_states=c).sample
        pseudo_pred = unet(x_t, t, encoder_hidden_states=pseudo.expand(2, -1, -1)).sample
    assert 0 <= uniform.min() and uniform.max() < 1  # U[0, 1), not the Gaussian noise x_t was made with
    assert torch.equal(got_f, F.mse_loss(pred, uniform))
    assert torch.equal(got_p, F.mse_loss(pred, pseudo_pred))
    assert torch.equal(got_r, F.mse_loss(pred, eps))
    r, f = torch.tensor(0.5), torch.tensor(2.0)
    assert float(erasediff.outer_objective(r, f, 1.5, 0.25)) == 0.5 + 0.25 * (2.0 - 1.5)


def test_inner_steps_restore_the_parameters_and_keep_adams_moments():
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    start = [p.detach().clone() for p in params]
    opt = numerics.adam(params, lr=0.1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    losses = erasediff.inner_phase(params, opt, 3, 0.05, lambda: lin(x).pow(2).mean())
    assert len(losses) == 3 and losses[2] < losses[0]  # the steps did move the parameters
    assert all(torch.equal(p, s) for p, s in zip(params, start))  # theta_i back
    assert all(float(opt.state[p]["step"]) == 3 and opt.state[p]["exp_avg"].abs().sum() > 0 for p in params)


def test_a_batch_samples_the_posterior_of_distinct_images():
    """Without replacement (all images when fewer), each latent a fresh posterior sample (their get_input)."""
    mean = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 4, 2, 2).clone()
    images = erasediff.EncodedSet(mean, torch.full((5, 4, 2, 2), 0.5), torch.tensor([0, 1, 0, 1, 0]),
                                  torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)))
    z, c = images.batch(3, torch.Generator().manual_seed(0), "cpu")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(5, generator=g)[:3]
    assert torch.equal(z, mean[idx] + 0.5 * torch.randn(3, 4, 2, 2, generator=g))
    assert torch.equal(c, images.contexts[images.prompt_ids[idx]])
    exact = dataclasses.replace(images, std=torch.zeros(5, 4, 2, 2))
    z, _ = exact.batch(9, torch.Generator().manual_seed(0), "cpu")
    assert sorted(z[:, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4]  # a batch larger than the set: each image once


def _trainer(base_parts, **settings) -> erasediff.Trainer:
    """A Trainer on a copy of the tiny UNet and two small made-up latent sets (no VAE)."""
    from common.training import select_trainable

    unet = copy.deepcopy(base_parts.unet)
    params = select_trainable(unet, erasediff.trainable_names(unet, "noxattn"))
    g = torch.Generator().manual_seed(0)
    contexts = encode_prompts(base_parts.tokenizer, base_parts.text_encoder, [CONCEPT, OTHER], "cpu")

    def latents(n, prompt):
        return erasediff.EncodedSet(torch.randn(n, 4, 8, 8, generator=g), torch.full((n, 4, 8, 8), 0.1),
                                    torch.zeros(n, dtype=torch.long), contexts[prompt:prompt + 1])

    s = {"batch_size": 2, "inner_steps": 2, "learning_rate": 1e-3, "inner_learning_rate": 5e-4, "lambda_bome": 1.0,
         "forget_target": "uniform", **settings}
    return erasediff.Trainer(unet, base_parts.noise_scheduler, latents(3, 0), latents(3, 1), params,
                             numerics.adam(params, lr=s["learning_rate"]), s, seed=0, device="cpu")


def test_a_step_shares_one_optimizer_at_two_learning_rates_and_repeats_its_bits(base_parts, monkeypatch):
    lrs = []
    real = erasediff.set_lr
    monkeypatch.setattr(erasediff, "set_lr", lambda opt, lr: (lrs.append(lr), real(opt, lr)))
    a, b = _trainer(base_parts), _trainer(base_parts)
    for i in range(2):
        a.step(i)
        b.step(i)
    assert lrs == [5e-4, 1e-3] * 4  # inner steps at --inner_learning_rate, the outer step at --learning_rate
    assert all(float(a.optimizer.state[p]["step"]) == 2 * 3 for p in a.params)  # K inner + 1 outer, one Adam
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))  # a seed repeats its bits
    h = a.history.values
    assert h["q"][0] == h["forget"][0] - h["reference"][0] and len(h["retain"]) == 2


# ---- the runs: data, card, loss, seeds, resume --------------------------------------------

def test_the_card_records_the_data_the_settings_and_the_objective(runs):
    card = _card(runs["generated"])
    forget, retain = card["data"]["forget"], card["data"]["retain"]
    assert forget["images"] == 4 and forget["prompts"] == [CONCEPT] and forget["generated"]["seed"] == 0
    assert retain["images"] == 4 and retain["prompts"] == [OTHER] and retain["generated"]["seed"] == 1
    assert forget["folder"].endswith(os.path.join(base.DATA_DIR, "forget"))
    hyper = card["hyperparameters"]
    assert hyper["forget_prompts"] == [CONCEPT] and hyper["inner_learning_rate"] == 1e-3
    assert hyper["train_method"] == "noxattn" and hyper["forget_target"] == "uniform" and hyper["resolution"] == 32
    assert card["erase"] == [CONCEPT] and card["training"] == {"checkpoint_every": EVERY, "resumed_from_step": None}
    probe = card["results"]["objective_on_probes"]
    print("EraseDiff on fixed batches:", probe["before"], "->", probe["after"])
    assert probe["after"]["forget"] < 0.9 * probe["before"]["forget"]  # the forget loss falls
    assert probe["after"]["objective"] < probe["before"]["objective"]
    assert card["results"]["constraint_q"]["last"] is not None
    for out in (runs["generated"], runs["resumed"]):
        assert not os.path.exists(os.path.join(out, base.CHECKPOINT_DIR))


def test_a_seed_repeats_its_bits_and_a_killed_run_resumes_to_them(runs):
    """A second run of the seed, on the reference run's images read from folders, killed after step 3 (it left
    only its checkpoint, of step 2), refused without --resume, resumed: the reference run's bits and results."""
    assert runs["left_by_kill"] == [base.CHECKPOINT_DIR] and runs["refused_without_resume"] == 2
    assert not _changed(_weights(runs["generated"]), _weights(runs["resumed"]))
    full, resumed = _card(runs["generated"]), _card(runs["resumed"])
    assert resumed["training"] == {"checkpoint_every": EVERY, "resumed_from_step": EVERY}
    assert full["results"] == resumed["results"]
    assert resumed["data"]["forget"]["generated"] is None
    assert resumed["data"]["forget"]["folder"] == full["data"]["forget"]["folder"]


# ---- bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--forget_data", "{tmp}/nope"], "--forget_data {tmp}/nope: no such directory"),
    (["--forget_data", "{tmp}/empty"], "--forget_data {tmp}/empty: no metadata.jsonl"),
    (["--retain_data", "{tmp}/norows"], "no rows"),
    (["--retain_data", "{tmp}/empty", "--retain_prompts", "x"], "--retain_prompts: give --retain_data or"),
    ([], "--retain_prompts: required without --retain_data"),
    (["--inner_steps", "0"], "--inner_steps 0: must be at least 1"),
    (["--iterations", "-2"], "--iterations -2: must be at least 1"),
    (["--learning_rate", "0"], "--learning_rate 0.0: must be > 0"),
    (["--inner_learning_rate=-1e-5"], "--inner_learning_rate -1e-05: must be > 0"),
    (["--lambda_bome", "-1"], "--lambda_bome -1.0: must be > 0"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--train_method", "attn"], "--train_method attn: must be one of noxattn"),
    (["--pseudo_prompt", "a", "b"], "--pseudo_prompt: one prompt"),
    (["--eta", "2"], "--eta: not used by --method erasediff"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(extra, message, assets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "norows").mkdir()
    (tmp_path / "norows" / "metadata.jsonl").write_text("\n")
    if "--retain_prompts" not in extra and "--retain_data" not in extra and message.find("required") < 0:
        extra = extra + ["--retain_prompts", OTHER]
    out = tmp_path / "out"
    argv = ["--method", "erasediff", "--concept", CONCEPT, "--model", assets["sd"], "--output_dir", str(out),
            *[e.replace("{tmp}", str(tmp_path)) for e in extra]]
    refused(argv, message.replace("{tmp}", str(tmp_path)), capsys, out)
