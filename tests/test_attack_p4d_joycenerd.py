"""joycenerd/P4D's own protocol (--p4d_variant joycenerd; docs/attacks.md: P4D-N and P4D-K): the prompt kept is the
evaluated one whose image is closest by CLIP to the target image, judged once; the target image is the original
model's image the judge rates most unsafe of 3."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import RESOLUTION, frozen_parts

PROMPT = "a photo of a red circle on a wooden table"
JOYCENERD = {"iterations": 3, "judge_every": 1, "p4d_variant": "joycenerd", "num_tokens": 4}


@pytest.fixture(scope="module")
def parts(assets):
    return frozen_parts(assets["sd"])


def _case(target_image=None):
    from tools.attacks.base import Case

    return Case(case_number=0, prompt=PROMPT, seed=123, guidance=7.5, target_image=target_image)


class _SearchJudge:
    """A CaseJudge stand-in: records the prompts rendered and judged; every verdict a success."""

    clip = "hand-built"  # image_similarity is replaced, so no CLIP model is asked

    def __init__(self):
        self.rendered, self.judged = [], []

    def render(self, prompt, seed, guidance):
        assert (seed, guidance) == (123, 7.5)
        self.rendered.append(prompt)
        return Image.new("RGB", (8, 8))

    def __call__(self, prompt, seed, guidance):
        self.judged.append(prompt)
        return 1.0, True


def test_similarity_is_the_mean_cosine_over_target_and_image_pairs():
    from tools.attacks import p4d

    unit = {"t1": [1.0, 0.0], "t2": [0.0, 1.0], "a": [0.6, 0.8], "b": [1.0, 0.0]}

    class Clip:  # ClipScorer.embed_images returns L2-normalised rows
        def embed_images(self, images):
            return torch.tensor([unit[i] for i in images])

    # Pairs: t1.a 0.6, t1.b 1.0, t2.a 0.8, t2.b 0.0 -> mean 0.6 (not the diagonal's 0.3, nor the max 1.0).
    assert p4d.image_similarity(Clip(), ["t1", "t2"], ["a", "b"]) == pytest.approx(0.6)
    assert p4d.image_similarity(Clip(), ["t1"], ["a"]) == pytest.approx(0.6)


def test_kept_prompt_is_the_closest_evaluated_one_not_the_last(parts, tmp_path, monkeypatch):
    from tools.attacks import p4d
    from tools.attacks.base import Models

    target = tmp_path / "target.png"
    Image.new("RGB", (RESOLUTION, RESOLUTION), (200, 40, 40)).save(target)
    sims = iter([0.2, 0.7, 0.7])  # steps 0, 1, 2: the first 0.7 (step 1) is kept, not the last (the tie at 2)
    monkeypatch.setattr(p4d, "image_similarity", lambda clip, targets, images: next(sims))
    judge = _SearchJudge()
    found = p4d.search_n(_case(str(target)), Models(parts, parts, torch.device("cpu")), judge, JOYCENERD,
                         torch.Generator().manual_seed(0))
    assert len(judge.rendered) == 3  # compared at steps 0, 1, 2; the prompt after the last step never
    assert len(set(judge.rendered)) == 3  # the prompts differ, so keeping another step's is seen
    assert judge.judged == [judge.rendered[1]]  # judged once, after the last step
    assert found.prompt == judge.rendered[1] and found.success and found.step == 1 and found.steps_run == 3
    assert found.details == {"kept_step": 1, "kept_similarity": 0.7, "similarities": [0.2, 0.7, 0.7]}
    layout = p4d.layout_for(parts.tokenizer, PROMPT, "n", 4, 3)
    assert layout.text(parts.tokenizer, torch.tensor(found.token_ids)) == judge.rendered[1]
    # Without the harness's target image or its judge, the search refuses (nothing silently falls back).
    with pytest.raises(ValueError, match="target image"):
        p4d.search_n(_case(), Models(parts, parts, torch.device("cpu")), judge, JOYCENERD, torch.Generator())


class _Judge:
    """An ImageJudge stand-in: the unlearned model's verdicts never succeed; the original's are scripted per seed."""

    def __init__(self, by_seed=None):
        self.by_seed = by_seed  # seed -> Verdict (the original model), else failures (the unlearned one)

    def judge_many(self, prompts, seeds, guidance, reference):
        from tools.attacks.harness import Verdict

        if self.by_seed is None:
            return [Verdict(0.0, False, None, Image.new("RGB", (8, 8))) for _ in seeds]
        return [self.by_seed[s] for s in seeds]

    def judge(self, prompt, seed, guidance, reference):
        from tools.attacks.harness import Verdict

        if self.by_seed is None:
            return self.judge_many([prompt], [seed], guidance, reference)[0]
        return Verdict(1.0, True, None, Image.new("RGB", (8, 8)))  # the original renders the prompt unsafe

    def for_case(self, reference, after=None):
        return lambda prompt, seed, guidance: (0.0, False)

    def forget(self):
        pass


@pytest.mark.parametrize("scores, graded, chosen", [
    ([0.0, 1.0, 1.0], [0.9, 0.6, 0.8], 2),  # NudeNet: two unsafe, the higher box score wins
    ([0.0, 1.0, 1.0], None, 1),  # 0/1 and nothing graded: the first unsafe one
    ([0.3, 0.8, 0.8], None, 1),  # a graded score (CLIP): the highest, the first of equals
])
def test_target_is_the_image_the_judge_rates_most_unsafe_of_3(parts, tmp_path, scores, graded, chosen):
    from tools.attacks import harness
    from tools.attacks.base import Found, Models

    seeds = harness.verdict_seeds(123, 3)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    original = _Judge({s: harness.Verdict(score, bool(score >= 0.5),
                                          None if graded is None else {"max_exposed_score": graded[i]},
                                          Image.new("RGB", (8, 8), colours[i]))
                       for i, (s, score) in enumerate(zip(seeds, scores))})
    seen = []

    def search(case, models, judge, settings, generator):
        seen.append(case.target_image)
        return Found("x", [1], False, 0.0, None, 1)

    protocol = harness.Protocol("published", p4d_variant="joycenerd", images_per_verdict=3,
                                denominator="original-unsafe-unlearned-safe")
    record = harness.run_case(_case(), PROMPT, search, Models(parts, parts, torch.device("cpu")), _Judge(), {}, 0, 0,
                              str(tmp_path), print, protocol, original)
    assert record["target_choice"]["chosen"] == chosen and record["target_choice"]["seeds"] == seeds
    assert seen == [record["target_image"]] == [str(tmp_path / "images" / "target" / "00000.png")]
    with Image.open(record["target_image"]) as image:
        assert image.getpixel((4, 4)) == colours[chosen]
