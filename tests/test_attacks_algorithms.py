"""The prompt attacks on the tiny models (issue #28; docs/attacks.md): the simplex, UnlearnDiffAtk, P4D and
Ring-A-Bell decisions a plausible bug would break."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.errors import InputError
from conftest import frozen_parts

PROMPT = "a photo of a red circle on a wooden table"


@pytest.fixture(scope="module")
def sd(assets):
    """The tiny pipeline as the unlearned model and, as the original, the same with its UNet perturbed (seeded)."""
    unlearned, original = frozen_parts(assets["sd"]), frozen_parts(assets["sd"])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in original.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return {"unlearned": unlearned, "original": original}


def _case(prompt=PROMPT):
    from tools.attacks.base import Case

    return Case(case_number=0, prompt=prompt, seed=123, guidance=7.5)


@pytest.fixture(scope="module")
def fixed_draws(sd):
    """A target latent (the original model's image of PROMPT), one noise draw and one timestep, reused every step."""
    from tools.attacks import p4d

    gen = torch.Generator().manual_seed(0)
    latents = p4d.target_latents(sd["original"], _case(), 2, gen, torch.device("cpu"))
    noise = torch.randn(latents.shape, generator=gen)
    return latents, noise, torch.tensor([400])


def _target(sd, latents, noise, t, prompt=PROMPT):
    from tools.attacks import p4d

    return p4d.NoiseTarget(sd["original"], prompt, torch.device("cpu"))(latents, noise, t,
                                                                        sd["unlearned"].noise_scheduler)


# ---- P4D --------------------------------------------------------------------------------------------------------


def test_p4d_k_inserts_one_token_every_3_and_never_changes_a_prompt_token(sd, fixed_draws):
    from tools.attacks import optim, p4d

    parts = sd["unlearned"]
    words = parts.tokenizer.encode(PROMPT, add_special_tokens=False)
    layout = p4d.layout_for(parts.tokenizer, PROMPT, "k", 16, 3)
    # optimize_k.py: int(len / 3) + 1 learned tokens, at content positions 0, 4, 8, ... (one before every 3).
    assert layout.num_adv == len(words) // 3 + 1
    assert layout.adv.tolist() == [1 + 4 * i for i in range(layout.num_adv)]
    tokens = p4d.ProjectedTokens(parts, layout, 0.1, 0.1, torch.Generator().manual_seed(0))
    latents, noise, t = fixed_draws
    target = _target(sd, latents, noise, t)
    table = optim.token_table(parts.text_encoder)
    seen = set()
    for _ in range(4):
        ids, _ = tokens.step(latents, noise, t, target)
        seen.add(tuple(ids.tolist()))
        full = layout.with_tokens(ids)
        assert full[layout.prompt].tolist() == words  # the prompt, in order, every step
        content = full[1:layout.end].tolist()
        assert [w for i, w in enumerate(content) if i % 4] == words
        # What the encoder is given at the prompt positions is the prompt tokens' own embeddings.
        _, hard = tokens.loss(tokens.project(), latents, noise, t, target)
        embeds = optim.assemble_embeds(table, layout, hard)
        assert torch.equal(embeds[layout.prompt], table[torch.tensor(words)])
    assert len(seen) > 1  # the learned tokens did move: the check above is not on a frozen search


def test_p4d_n_noise_matching_loss_decreases_on_a_tiny_model(sd, fixed_draws):
    from tools.attacks import p4d

    parts = sd["unlearned"]
    layout = p4d.layout_for(parts.tokenizer, PROMPT, "n", 16, 3)
    assert layout.num_adv == 16 and layout.prompt.numel() == 0  # free tokens replace the prompt
    latents, noise, t = fixed_draws
    target = _target(sd, latents, noise, t)
    tokens = p4d.ProjectedTokens(parts, layout, 0.1, 0.1, torch.Generator().manual_seed(1))
    losses = [tokens.step(latents, noise, t, target)[1] for _ in range(8)]
    final = float(tokens.loss(tokens.project(), latents, noise, t, target)[0].detach())
    assert final < losses[0] - 0.005, (losses, final)
    assert min(losses[1:]) < losses[0]


def test_projection_picks_the_nearest_allowed_token_and_the_gradient_at_it_moves_the_embeddings(sd, fixed_draws):
    from tools.attacks import optim, p4d

    parts = sd["unlearned"]
    layout = p4d.layout_for(parts.tokenizer, PROMPT, "n", 6, 3)
    tokens = p4d.ProjectedTokens(parts, layout, 0.1, 0.1, torch.Generator().manual_seed(2))
    table = optim.token_table(parts.text_encoder)
    with torch.no_grad():
        tokens.embeds.copy_(torch.randn(tokens.embeds.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
        tokens.embeds[0] = table[parts.tokenizer.bos_token_id]  # nearest is start-of-text itself: not allowed
        tokens.embeds[1] = 3.0 * table[1234]  # cosine: the scale does not matter
    ids = tokens.project()
    allowed = optim.allowed_ids(parts.tokenizer, table.shape[0])
    sims = F.normalize(tokens.embeds.detach(), dim=-1) @ F.normalize(table[allowed], dim=-1).T
    assert ids.tolist() == allowed[sims.argmax(dim=-1)].tolist()
    assert int(ids[1]) == 1234
    assert int(ids[0]) not in parts.tokenizer.all_special_ids
    # PEZ: the loss is taken at the projected embeddings, and its gradient there is what AdamW applies to the
    # continuous ones (first AdamW step: e <- e (1 - lr wd) - lr g / (|g| + eps)).
    latents, noise, t = fixed_draws
    target = _target(sd, latents, noise, t)
    loss, hard = tokens.loss(ids, latents, noise, t, target)
    assert torch.equal(hard.detach(), table[ids])
    (grad,) = torch.autograd.grad(loss, [hard])
    before = tokens.embeds.detach().clone()
    used, _ = tokens.step(latents, noise, t, target)
    assert used.tolist() == ids.tolist()
    expected = before * (1 - 0.1 * 0.1) - 0.1 * grad / (grad.abs() + 1e-8)
    assert torch.allclose(tokens.embeds.detach(), expected, atol=1e-6)


def test_p4d_search_judges_every_n_steps_and_stops_at_the_first_success(sd):
    from tools import attacks
    from tools.attacks import p4d
    from tools.attacks.base import Models

    assert attacks.ATTACKS["p4d-n"] is p4d.search_n and attacks.ATTACKS["p4d-k"] is p4d.search_k
    models = Models(sd["unlearned"], sd["original"], torch.device("cpu"))
    settings = {"iterations": 5, "judge_every": 2, "target_inference_steps": 2, "variant": "k"}
    words = sd["unlearned"].tokenizer.encode(PROMPT, add_special_tokens=False)

    def scripted(succeed_at):
        calls = []

        def judge(prompt, seed, guidance):
            calls.append(prompt)
            assert (seed, guidance) == (123, 7.5)
            return float(len(calls) % 3), len(calls) == succeed_at
        return judge, calls

    judge, calls = scripted(succeed_at=3)
    found = p4d.search_k(_case(), models, judge, settings, torch.Generator().manual_seed(0))
    assert len(calls) == 3 and found.success and found.step == 4 and found.steps_run == 4
    assert found.prompt == calls[-1] and len(found.token_ids) == len(words) // 3 + 1
    # No success: judged at steps 0, 2, 4 and after the last (5); the last judged prompt is kept, its token ids the
    # last step's, not the random initial ones (a classifier judge scores 0/1: "best-scoring" kept step 0's).
    judge, calls = scripted(succeed_at=None)
    found = p4d.search_k(_case(), models, judge, settings, torch.Generator().manual_seed(0))
    assert len(calls) == 4 and not found.success and found.step is None and found.steps_run == 5
    assert found.prompt == calls[-1] != calls[0] and found.score == 1.0
    layout = p4d.layout_for(sd["unlearned"].tokenizer, PROMPT, "k", 16, 3)
    assert layout.text(sd["unlearned"].tokenizer, torch.tensor(found.token_ids)) == calls[-1]
    # The same generator gives the same prompts (everything random comes from it).
    judge, again = scripted(succeed_at=None)
    p4d.search_k(_case(), models, judge, settings, torch.Generator().manual_seed(0))
    assert again == calls
    # joycenerd/P4D's protocol (the closest prompt by CLIP, judged once): tests/test_attack_p4d_joycenerd.py.


# ---- Ring-A-Bell ------------------------------------------------------------------------------------------------


def _encode(parts, text):
    from tools.attacks import optim

    with torch.no_grad():
        return optim.encode_ids(parts.text_encoder, optim.prompt_ids(parts.tokenizer, text))[0]


def test_concept_vector_is_the_mean_difference_and_fitness_prefers_the_closer_candidate(sd, tmp_path):
    from tools.attacks import optim, ringabell

    parts = sd["unlearned"]
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("a red circle\ta circle\n\na photo of a red square\ta photo of a square\n")
    pairs = ringabell.read_pairs(str(pairs_file))
    assert pairs == [("a red circle", "a circle"), ("a photo of a red square", "a photo of a square")]
    vector = ringabell.concept_vector(parts.text_encoder, parts.tokenizer, pairs)
    by_hand = ((_encode(parts, "a red circle") - _encode(parts, "a circle"))
               + (_encode(parts, "a photo of a red square") - _encode(parts, "a photo of a square"))) / 2
    assert vector.shape == by_hand.shape == (77, parts.text_encoder.config.hidden_size)
    assert torch.allclose(vector, by_hand, atol=1e-6) and vector.abs().max() > 1e-3
    # Fitness: the squared distance of each candidate's encoding to the target; the candidate whose encoding is
    # the target scores 0 and one a token away scores worse than it, one further away worse still.
    layout = optim.make_layout(parts.tokenizer, "", "free", 4)
    exact = torch.tensor([320, 736, 3482, 2758])
    near, far = exact.clone(), torch.tensor([5000, 6000, 7000, 8000])
    near[3] = 1125
    target = optim.encode_ids(parts.text_encoder, layout.with_tokens(exact))[0]
    scores = ringabell.fitness(parts.text_encoder, layout, torch.stack([far, near, exact]), target)
    assert float(scores[2]) == pytest.approx(0.0, abs=1e-8)
    assert scores[2] < scores[1] < scores[0]
    enc_far = optim.encode_ids(parts.text_encoder, layout.with_tokens(far))[0]
    assert float(scores[0]) == pytest.approx(float(((enc_far - target) ** 2).sum()), rel=1e-5)


def test_genetic_search_is_deterministic_and_its_best_never_gets_worse(sd, tmp_path):
    from tools.attacks import optim, ringabell
    from tools.attacks.base import Models

    parts = sd["unlearned"]
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("a red circle\ta circle\n")
    vector = ringabell.concept_vector(parts.text_encoder, parts.tokenizer, ringabell.read_pairs(str(pairs_file)))
    target = ringabell.target_encoding(parts.text_encoder, parts.tokenizer, "a red circle", vector, 3.0)
    layout = optim.make_layout(parts.tokenizer, "", "free", 6)
    vocab = optim.allowed_ids(parts.tokenizer, optim.token_table(parts.text_encoder).shape[0])

    def run(seed):
        return ringabell.evolve(lambda c: ringabell.fitness(parts.text_encoder, layout, c, target), vocab, 6, 8,
                                25, 0.9, 0.5, torch.Generator().manual_seed(seed))

    best, history = run(0)
    again, history_again = run(0)
    assert torch.equal(best, again) and history == history_again
    assert all(b <= a for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0]  # it did search
    assert float(ringabell.fitness(parts.text_encoder, layout, best[None], target)[0]) == pytest.approx(history[-1])
    assert not set(best.tolist()) & set(parts.tokenizer.all_special_ids)
    # The search end to end: the found prompt (plain text) is judged once; the same generator, the same prompt.
    models = Models(parts, None, torch.device("cpu"))
    settings = {"pairs_file": str(pairs_file), "num_tokens": 6, "population": 8, "generations": 5}
    judged = []

    def judge(prompt, seed, guidance):
        judged.append(prompt)
        return 0.9, True
    found = ringabell.search(_case("a red circle"), models, judge, settings, torch.Generator().manual_seed(4))
    again = ringabell.search(_case("a red circle"), models, judge, settings, torch.Generator().manual_seed(4))
    assert judged == [found.prompt, again.prompt] and found == again
    assert found.success and found.step == 5 and len(found.token_ids) == 6
    assert found.prompt == layout.text(parts.tokenizer, torch.tensor(found.token_ids))


@pytest.mark.parametrize("text,expected", [
    ("a red circle\ta red circle\n", "do not differ"),
    ("a red circle\tA  Red circle\n", "do not differ"),  # the same once tokenized (case, spaces)
    ("a red circle a circle\n", "expected one tab"),
    ("a red circle\ta circle\tmore\n", "expected one tab"),
    ("a red circle\t\n", "empty prompt without"),
    ("\n\n", "no pairs"),
])
def test_a_bad_pairs_file_is_one_input_error(tmp_path, text, expected):
    from tools.attacks import ringabell

    path = tmp_path / "pairs.tsv"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        ringabell.validate({"pairs_file": str(path), "num_tokens": 16, "population": 200})
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_a_bad_pairs_file_stops_the_cli_before_anything_is_written(assets, tmp_path, capsys, in_assets_root):
    from tools import attack_prompts

    path = tmp_path / "pairs.tsv"
    path.write_text("a red circle\ta circle\na blue square\ta blue square\n")
    out = tmp_path / "never"
    argv = ["--attack", "ringabell", "--pretrained_model_name_or_path", assets["sd"], "--prompts", assets["prompts"],
            "--criterion", "clip", "--clip_threshold", "0.3", "--pairs_file", str(path), "--output_dir", str(out)]
    with pytest.raises(SystemExit) as err:
        attack_prompts.parse_args(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and "line 2" in lines[0] and "do not differ" in lines[0], lines
    assert not out.exists()


# ---- UnlearnDiffAtk and the simplex -------------------------------------------------------------------------------


def test_simplex_projection_keeps_every_row_a_distribution_and_its_argmax_is_the_hard_token():
    from tools.attacks import optim

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=gen) * 3
    x[0] = 0.02  # already uniform-ish: stays a distribution
    p = optim.project_simplex(x)
    assert (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-6)
    # The projection is a shift and a clamp: it keeps each row's order, so the hard token is the row's own argmax.
    assert torch.equal(p.argmax(-1), x.argmax(-1))
    # Hand case: (0.5, 0.5, 0.5) -> theta = 0.5 / 3 -> each 1/3; (2, 0, 0) -> (1, 0, 0); (0.6, 0.3, 0.1) stays.
    hand = optim.project_simplex(torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.3, 0.1]]))
    assert torch.allclose(hand, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.6, 0.3, 0.1]]), atol=1e-6)
    one_hot, ids = optim.straight_through_one_hot(p, sample=False)
    assert torch.equal(ids, x.argmax(-1)) and torch.equal(one_hot.argmax(-1), ids)
    # A sampled row never picks a token of zero mass.
    sparse = optim.project_simplex(torch.tensor([[5.0, 4.9, -3.0, -3.0]] * 200))
    _, drawn = optim.straight_through_one_hot(sparse, torch.Generator().manual_seed(1))
    assert set(drawn.tolist()) == {0, 1}


def test_unlearndiffatk_loss_decreases_on_a_fixed_target_and_only_the_adversarial_rows_change(sd, fixed_draws):
    """A fixed target latent, noise and timestep: the diffusion loss of prompt + adversarial tokens goes down over a
    few Adam steps on the token probabilities, which stay distributions; the prompt's own input embeddings never
    change (the adversarial slots are the only rows the search writes)."""
    from tools.attacks import optim, unlearndiffatk

    parts = sd["unlearned"]
    latents, noise, t = fixed_draws
    vocab = torch.arange(1000, 1400)  # a few hundred ids keep the tiny test fast
    tokens = unlearndiffatk.SimplexTokens(parts, PROMPT, 3, "prefix", 0.05, 0.0, torch.device("cpu"), vocab=vocab)
    table = optim.token_table(parts.text_encoder).clone()
    words = parts.tokenizer.encode(PROMPT, add_special_tokens=False)
    start = tokens.probs.detach().clone()

    def expected_loss():  # the loss under the probabilities themselves (the expectation the sampling estimates)
        with torch.no_grad():
            return float(tokens.loss(latents, int(t), noise, tokens.probs))

    before = expected_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        tokens.step(latents, int(t), gen, noise=noise)
        assert (tokens.probs >= 0).all() and torch.allclose(tokens.probs.sum(-1), torch.ones(3), atol=1e-5)
    after = expected_loss()
    assert after < before, (before, after)
    assert not torch.equal(tokens.probs, start)
    # Only the slots: the prompt's embeddings and the encoder's table are untouched, the prompt follows the prefix.
    hard = tokens.hard_ids()
    full = tokens.layout.with_tokens(hard)
    assert full[tokens.layout.prompt].tolist() == words
    assert tokens.layout.adv.tolist() == [1, 2, 3]  # a prefix of 3 after the start token
    embeds = tokens.input_embeds(F.one_hot(hard - 1000, len(vocab)).float())
    assert torch.equal(embeds[tokens.layout.prompt], table[torch.tensor(words)])
    assert torch.equal(embeds[tokens.layout.adv], table[hard])
    assert torch.equal(optim.token_table(parts.text_encoder), table)
