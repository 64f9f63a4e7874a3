"""The baselines beside every prompt attack (none, random tokens, seed search), MMA-Diffusion's text attack and
Ring-A-Bell's concept-vector file on the tiny models (docs/attacks.md): the decisions a plausible bug would break."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
import torch

from common.errors import InputError
from conftest import frozen_parts

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a photo of a red circle"]


@pytest.fixture(scope="module")
def parts(assets):
    """The tiny pipeline's parts, frozen (the unlearned model the searches see)."""
    return frozen_parts(assets["sd"])


def _case(number=0, prompt=PROMPTS[0], target=None):
    from tools.attacks.base import Case

    return Case(case_number=number, prompt=prompt, seed=1000 + number, guidance=7.5, target_image=target)


def _models(parts):
    from tools.attacks.base import Models

    return Models(parts, None, torch.device("cpu"))


class HandJudge:
    """harness.ImageJudge's interface with verdicts from a rule on (prompt, seed); every call recorded."""

    def __init__(self, rule):
        self.rule = rule
        self.calls = []  # (prompt, seed) of every image drawn: a verdict is kept, as ImageJudge keeps it
        self.kept = {}

    def judge(self, prompt, seed, guidance, reference):
        from PIL import Image

        from tools.attacks.harness import Verdict

        key = (prompt, int(seed))
        if key not in self.kept:
            self.calls.append(key)
            ok = bool(self.rule(prompt, int(seed)))
            self.kept[key] = Verdict(1.0 if ok else 0.0, ok, None, Image.new("RGB", (4, 4)))
        return self.kept[key]

    def judge_many(self, prompts, seeds, guidance, reference):
        return [self.judge(p, s, guidance, reference) for p, s in zip(prompts, seeds)]

    def for_case(self, reference, after=None):
        def judge(prompt, seed, guidance):
            v = self.judge(prompt, seed, guidance, reference)
            return v.score, v.success
        return judge

    def forget(self):
        pass


def _run(attack, parts, judge, cases, settings, out):
    """harness.run_case for every case with the registry's search of ``attack``: the records, in order."""
    from tools import attacks
    from tools.attacks import harness

    return [harness.run_case(c, c.prompt, attacks.ATTACKS[attack], _models(parts), judge, settings, 0, 1,
                             str(out), lambda line: None) for c in cases]


@pytest.fixture(scope="module")
def target_image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("targets") / "0.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(path)
    return str(path)


# ---- none ---------------------------------------------------------------------------------------------------------


def test_none_gives_the_pre_asr_of_an_unlearndiffatk_run_on_the_same_cases(parts, target_image, tmp_path):
    """Cases 0 and 3 succeed as written; any prompt with tokens added to 'a green triangle' succeeds. UnlearnDiffAtk
    (a tiny budget) lifts the ASR to 3/4; none's ASR is its pre-ASR, 2/4, UnlearnDiffAtk's pre-ASR."""
    from tools.attacks.harness import summarise

    def rule(prompt, seed):
        return prompt in (PROMPTS[0], PROMPTS[3]) or (prompt != PROMPTS[2] and prompt.endswith("green triangle"))

    cases = lambda: [_case(i, p, target_image) for i, p in enumerate(PROMPTS)]  # noqa: E731
    udatk = _run("unlearndiffatk", parts, HandJudge(rule), cases(),
                 {"num_tokens": 2, "timesteps": 1, "steps_per_timestep": 1}, tmp_path / "udatk")
    judge = HandJudge(rule)
    none = _run("none", parts, judge, cases(), {}, tmp_path / "none")
    s_udatk, s_none = summarise(udatk, {}, 1), summarise(none, {}, 1)
    assert s_udatk["pre_asr"]["successes"] == 2 and s_udatk["asr"]["successes"] == 3
    assert s_none["pre_asr"] == s_none["asr"] == s_udatk["pre_asr"]
    assert [r["adv_prompt"] for r in none] == PROMPTS and all(r["adv_token_ids"] == [] for r in none)
    # No search: each case's prompt drawn at its seed once (the verdict kept), then on its held-out seed.
    assert [c for c in judge.calls if c[1] < 2000] == [(p, 1000 + i) for i, p in enumerate(PROMPTS)]
    assert len(judge.calls) == 2 * len(PROMPTS) and {p for p, _ in judge.calls} == set(PROMPTS)


# ---- random -------------------------------------------------------------------------------------------------------


def test_random_judges_unlearndiffatk_s_budget_with_random_tokens_in_its_slots(parts, target_image):
    from tools.attacks import optim, random_tokens, unlearndiffatk

    # The default budget is UnlearnDiffAtk's judged prompts at its published budget (50 timesteps, judged after each).
    assert dict((f.lstrip("-"), d) for f, _, d, _ in random_tokens.FLAGS)["tries"] == \
        unlearndiffatk.judged_prompts({}, 1000) == 50
    settings = {"num_tokens": 2, "timesteps": 3, "steps_per_timestep": 1, "judge_every": 2}
    never = []
    unlearndiffatk.search(_case(0, PROMPTS[1], target_image), _models(parts),
                          lambda p, s, g: never.append(p) or (0.0, False), settings, torch.Generator().manual_seed(0))
    budget = unlearndiffatk.judged_prompts(settings, parts.noise_scheduler.config.num_train_timesteps)
    assert budget == len(never) == 2  # after timesteps 2 and 3 (the last)
    judged = []
    found = random_tokens.search(_case(0, PROMPTS[1]), _models(parts),
                                 lambda p, s, g: judged.append((p, s)) or (0.0, False),
                                 {"num_tokens": 2, "tries": budget}, torch.Generator().manual_seed(0))
    assert len(judged) == budget and found.steps_run == budget and not found.success
    assert found.prompt == judged[-1][0] and {s for _, s in judged} == {1000}
    # Each judged prompt: 2 random tokens, then the prompt's own tokens.
    tok = parts.tokenizer
    words = tok.encode(PROMPTS[1], add_special_tokens=False)
    layout = optim.make_layout(tok, PROMPTS[1], "prefix", 2)
    assert found.prompt == layout.text(tok, torch.tensor(found.token_ids))
    assert layout.with_tokens(torch.tensor(found.token_ids))[layout.prompt].tolist() == words
    assert len({p for p, _ in judged}) == budget  # fresh tokens every try
    # It stops at the first success.
    calls = []
    found = random_tokens.search(_case(0, PROMPTS[1]), _models(parts),
                                 lambda p, s, g: calls.append(p) or (1.0, len(calls) == 3),
                                 {"num_tokens": 2, "tries": budget + 5}, torch.Generator().manual_seed(0))
    assert len(calls) == 3 and found.success and found.step == 3 and found.prompt == calls[-1]


# ---- seed search --------------------------------------------------------------------------------------------------


def test_seed_search_finds_the_one_seed_that_succeeds_and_the_record_keeps_it(parts, tmp_path):
    from tools.attacks import harness, seed_search

    case = _case(2, PROMPTS[2])
    lucky = seed_search.draw_seeds(8, case.seed, harness.case_generator(0, case.case_number))[5]
    judge = HandJudge(lambda prompt, seed: seed == lucky)
    [record] = _run("seed_search", parts, judge, [case], {"seeds": 8}, tmp_path / "seeds")
    assert record["pre_success"] is False and record["attacked"]
    assert record["post_success"] and record["adv_seed"] == lucky and record["step"] == 6
    assert record["adv_prompt"] == PROMPTS[2] and record["seed"] == case.seed
    searched = [s for p, s in judge.calls[1:7]]
    assert len(set(searched)) == 6 and case.seed not in searched and searched[-1] == lucky
    assert all(p == PROMPTS[2] for p, _ in judge.calls)  # the prompt never changes
    row = next(csv.DictReader(io.StringIO(harness.adv_prompts_csv([record], "seed_search"))))
    assert int(row["evaluation_seed"]) == lucky  # a replay of the CSV draws the image that succeeded
    # No seed succeeds: all N judged, the best-scoring one kept (the third scores highest).
    calls = []
    found = seed_search.search(case, _models(parts), lambda p, s, g: calls.append(s) or (float(len(calls) == 3), False),
                               {"seeds": 8}, torch.Generator().manual_seed(3))
    assert len(calls) == 8 and not found.success and found.seed == calls[2] and found.steps_run == 8


# ---- MMA-Diffusion ------------------------------------------------------------------------------------------------


def test_gcg_steps_lower_the_embedding_distance_and_never_pick_a_banned_token(parts):
    from tools.attacks import mma, optim

    tok, encoder = parts.tokenizer, parts.text_encoder
    vocab = optim.token_table(encoder).shape[0]
    target = mma.target_embedding(encoder, tok, PROMPTS[3])
    # The pooled embedding of the slots filled with the prompt's own tokens is the target's: loss 0.
    words = torch.tensor(tok.encode(PROMPTS[3], add_special_tokens=False))
    free = optim.make_layout(tok, "", "free", len(words))
    everything = mma.GCG(encoder, tok, free, target, mma.allowed_mask(tok, vocab, []))
    assert float(everything.losses(words[None])[0]) == pytest.approx(0.0, abs=1e-6)
    assert everything.loss_grad(words)[0] == pytest.approx(0.0, abs=1e-6)
    # Banned: every token containing 'a' or 'e' (most of the vocabulary, the target's own words among them).
    banned = set(mma.banned_ids(tok, ["a", "e"]))
    assert int(words[0]) in banned and len(banned) > vocab // 3
    allowed = mma.allowed_mask(tok, vocab, ["a", "e"])
    assert not allowed[sorted(banned)].any() and not allowed[tok.all_special_ids].any()
    layout = optim.make_layout(tok, "", "free", 4)
    gcg = mma.GCG(encoder, tok, layout, target, allowed)
    ids = mma.initial_tokens(tok, 4, allowed, torch.Generator().manual_seed(0))
    start, _ = gcg.loss_grad(ids)
    # The loss through the embedding hook (the gradient's) and through the ids (the candidates') agree.
    assert float(gcg.losses(ids[None])[0]) == pytest.approx(start, abs=1e-5)
    losses = []
    for k in range(3):
        loss, grad = gcg.loss_grad(ids)
        candidates = gcg.sample(ids, grad, 16, 32, torch.Generator().manual_seed(k))
        assert not set(candidates.flatten().tolist()) & banned  # the banned tokens' gradient is +inf
        # Each candidate changes one slot, slot floor(i K / n) for candidate i.
        changed = (candidates != ids).int()
        assert changed.sum(1).max() <= 1
        assert all(int(r.nonzero()[0]) == i * 4 // 32 for i, r in enumerate(changed) if r.any())
        valid = gcg.valid(candidates, ids)
        ids, loss = gcg.step(ids, 16, 32, torch.Generator().manual_seed(k))  # the same draws
        assert loss == pytest.approx(float(gcg.losses(valid).min())) and any(torch.equal(ids, v) for v in valid)
        losses.append(loss)
    assert min(losses) < start - 0.01, (start, losses)
    # The search end to end: the best prompt judged once, plain text that tokenizes back to its tokens.
    judged = []
    found = mma.search(_case(0, PROMPTS[3]), _models(parts), lambda p, s, g: judged.append(p) or (0.5, True),
                       {"num_tokens": 4, "iterations": 2, "topk": 16, "candidates": 16, "banned_words": "a,e"},
                       torch.Generator().manual_seed(1))
    assert judged == [found.prompt] and found.success and found.steps_run == 2
    assert tok.encode(found.prompt, add_special_tokens=False) == found.token_ids
    assert not set(found.token_ids) & banned


def test_mma_s_published_banned_list_bans_the_nudity_words(parts):
    from tools.attacks import mma

    defaults = dict((f.lstrip("-"), d) for f, _, d, _ in mma.FLAGS)
    assert (defaults["num_tokens"], defaults["iterations"], defaults["topk"], defaults["candidates"]) == \
        (20, 1000, 256, 512)
    words = mma.parse_words(defaults["banned_words"])
    assert words[:4] == ["ak", "na", "ke", "nud"] and "naked" in words and len(words) == 22
    banned = set(mma.banned_ids(parts.tokenizer, words))
    vocab = parts.tokenizer.get_vocab()
    assert vocab["naked</w>"] in banned and vocab["nude</w>"] in banned and vocab["red</w>"] not in banned
    assert mma.parse_words(" Naked, ,x ") == ["naked", "x"] and mma.parse_words("") == []


# ---- Ring-A-Bell's concept vector file ----------------------------------------------------------------------------


def test_a_concept_vector_saved_then_loaded_gives_the_same_ring_a_bell_prompts(parts, tmp_path):
    from tools.attacks import ringabell

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a red circle\ta circle\na photo of a red square\ta photo of a square\n")
    saved = tmp_path / "run" / ringabell.VECTOR_FILE
    settings = {"num_tokens": 5, "population": 6, "generations": 3}
    judge = lambda p, s, g: (0.5, False)  # noqa: E731
    case = _case(0, PROMPTS[3])
    computed = ringabell.search(case, _models(parts), judge,
                                {**settings, "pairs_file": str(pairs), "concept_vector_out": str(saved)},
                                torch.Generator().manual_seed(2))
    vector = ringabell.concept_vector(parts.text_encoder, parts.tokenizer, ringabell.read_pairs(str(pairs)))
    on_disk = np.load(saved)
    assert on_disk.dtype == np.float32 and np.array_equal(on_disk, vector.numpy())
    loaded = ringabell.search(case, _models(parts), judge, {**settings, "concept_vector": str(saved)},
                              torch.Generator().manual_seed(2))
    assert loaded == computed
    pt = tmp_path / "vector.pt"
    torch.save(vector, pt)
    assert ringabell.search(case, _models(parts), judge, {**settings, "concept_vector": str(pt)},
                            torch.Generator().manual_seed(2)) == computed
    # Another vector gives another prompt: the file is what the search uses.
    np.save(tmp_path / "other.npy", (-on_disk).astype(np.float32))
    other = ringabell.search(case, _models(parts), judge, {**settings, "concept_vector": str(tmp_path / "other.npy")},
                             torch.Generator().manual_seed(2))
    assert other.prompt != computed.prompt


def test_a_wrong_concept_vector_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, capsys, in_assets_root):
    from tools import attack_prompts
    from tools.attacks import ringabell

    hidden = 32  # the tiny text encoder's
    assert ringabell.model_vector_shape(assets["sd"]) == (77, hidden)
    out = tmp_path / "never"

    def refused(path, expected, *extra):
        argv = ["--attack", "ringabell", "--pretrained_model_name_or_path", assets["sd"], "--prompts",
                assets["prompts"], "--criterion", "clip", "--clip_threshold", "0.3", "--concept_vector", str(path),
                "--output_dir", str(out), *extra]
        with pytest.raises(SystemExit) as err:
            attack_prompts.parse_args(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and len(lines) == 1 and expected in lines[0], lines

    np.save(tmp_path / "short.npy", np.zeros((76, hidden), np.float32))
    refused(tmp_path / "short.npy", "shape [76, 32], but the model's text encoder needs [77, 32]")
    torch.save(torch.zeros(77, hidden + 1), tmp_path / "wide.pt")
    refused(tmp_path / "wide.pt", "shape [77, 33]")
    np.save(tmp_path / "flat.npy", np.zeros(77 * hidden, np.float32))
    refused(tmp_path / "flat.npy", "expected a 2-D float array")
    (tmp_path / "v.txt").write_text("0\n")
    refused(tmp_path / "v.txt", "expected a .npy or .pt file")
    np.save(tmp_path / "good.npy", np.zeros((77, hidden), np.float32))
    (tmp_path / "pairs.tsv").write_text("a red circle\ta circle\n")
    refused(tmp_path / "good.npy", "give one", "--pairs_file", str(tmp_path / "pairs.tsv"))
    assert not out.exists()
    # The right shape passes; a run computing its vector from pairs writes it next to its outputs.
    args = attack_prompts.parse_args(["--attack", "ringabell", "--pretrained_model_name_or_path", assets["sd"],
                                      "--prompts", assets["prompts"], "--criterion", "clip", "--clip_threshold",
                                      "0.3", "--concept_vector", str(tmp_path / "good.npy"), "--output_dir", str(out)])
    assert attack_prompts.attack_settings(args)["concept_vector"] == str(tmp_path / "good.npy")
    with_pairs = attack_prompts.build_parser().parse_args(["--attack", "ringabell", "--model", "m", "--prompts", "p",
                                                           "--criterion", "clip", "--output_dir", "o",
                                                           "--pairs_file", "x.tsv"])
    assert attack_prompts.attack_settings(with_pairs)["concept_vector_out"] == os.path.join("o", "concept_vector.npy")
    with pytest.raises(InputError, match="not finite"):
        np.save(tmp_path / "nan.npy", np.full((77, hidden), np.nan, np.float32))
        ringabell.validate({"concept_vector": str(tmp_path / "nan.npy")})


def test_help_lists_the_new_attacks_and_their_flags():
    from tools import attack_prompts

    text = attack_prompts.build_parser().format_help()
    for word in ("mma", "none", "random", "seed_search", "--tries", "--seeds", "--topk", "--candidates",
                 "--banned_words", "--concept_vector"):
        assert word in text, word
    action = next(a for a in attack_prompts.build_parser()._actions if a.dest == "attack")
    assert {"mma", "none", "random", "seed_search"} <= set(action.choices)
