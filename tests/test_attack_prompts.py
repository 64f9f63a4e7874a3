"""tools/attack_prompts.py's harness (issue #28; docs/attacks.md): statistics, records, resume, processes, replay,
bad input. The harness is driven by replay and by a toy search registered here; each real attack end to end at a
tiny budget where its module is present."""

from __future__ import annotations

import csv
import json
import os
import textwrap

import pytest

from conftest import RESOLUTION, ROOT, launch

# A search registered by the test's own launcher: random tokens from the case's generator before the prompt, up to
# --toy_tries candidates, stopping at the first judged success (as the published searches stop).
TOY_SEARCH = '''
import torch

from tools.attacks.base import Found

FLAGS = [("--num_tokens", int, 2, "adversarial tokens"), ("--toy_tries", int, 3, "candidates tried")]


def search(case, models, judge, settings, generator):
    tok = models.unlearned.tokenizer
    ids, text, score, success = [], case.prompt, None, False
    for step in range(1, settings["toy_tries"] + 1):
        ids = torch.randint(1000, 49000, (settings["num_tokens"],), generator=generator).tolist()
        text = tok.decode(ids).strip() + " " + case.prompt
        score, success = judge(text, case.seed, case.guidance)
        if success:
            return Found(text, ids, True, score, step, step)
    return Found(text, ids, False, score, None, settings["toy_tries"])
'''

LAUNCHER = f'''
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, {str(ROOT)!r})
from tools import attacks

attacks.register("toy", "toyattacks.search")
from tools import attack_prompts

attack_prompts._cli()
'''

PROMPTS = ["a red circle", "a photo of a red circle", "a blue square", "a green triangle"]
FOUR = 4  # cases in the standard run
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same float sums in every process layout


@pytest.fixture(scope="module")
def toy(assets, tmp_path_factory):
    """The launcher script (registers the toy search), a 4-prompt file and a CLIP threshold that splits them 2/2."""
    root = tmp_path_factory.mktemp("toyattack")
    pkg = root / "toyattacks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "search.py").write_text(textwrap.dedent(TOY_SEARCH))
    (root / "launch_attack.py").write_text(LAUNCHER)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = {"launcher": str(root / "launch_attack.py"), "prompts": str(prompts), "root": root}
    # Replay at a threshold below every cosine: the unattacked scores of the four cases.
    probe = run(assets, out, "replay", str(root / "probe"), threshold=-1.0)
    scores = sorted(r["pre_score"] for r in records(str(root / "probe")))
    assert probe["n"] == FOUR and len(set(scores)) == FOUR, scores
    out["threshold"] = (scores[1] + scores[2]) / 2  # two cases succeed unattacked, two are attacked
    return out


def flags(assets, toy, attack, out, threshold=None, **over):
    """The standard command line: tiny model, CLIP judge, 2 sampling steps, 2 held-out seeds."""
    f = {"--attack": attack, "--pretrained_model_name_or_path": assets["sd"], "--prompts": toy["prompts"],
         "--criterion": "clip", "--clip_threshold": toy.get("threshold") if threshold is None else threshold,
         "--num_inference_steps": 2, "--resolution": RESOLUTION, "--heldout_seeds": 2, "--output_dir": out,
         "--quiet": None}
    f.update(over)
    return [k if v is None else f"{k}={v}" for k, v in f.items() if v is not False]


def run(assets, toy, attack, out, threshold=None, processes=1, env=None, expect=0, **over):
    proc = launch(toy["launcher"], flags(assets, toy, attack, out, threshold, **over), cwd=assets["root"],
                  num_processes=processes, env_extra={**THREADS, **(env or {})})
    assert proc.returncode == expect, proc.stderr[-3000:]
    return json.load(open(os.path.join(out, "summary.json"))) if expect == 0 else proc


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]


def timeless(recs):
    """Records without their wall-clock seconds (the only field that may differ between equal runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


@pytest.fixture(scope="module")
def toy_run(assets, toy):
    """One uninterrupted toy attack on one process: the reference run."""
    out = str(toy["root"] / "reference")
    summary = run(assets, toy, "toy", out)
    return {"out": out, "summary": summary, "records": records(out)}


# ---- statistics -------------------------------------------------------------------------------------------------


def test_wilson_and_asr_equal_a_hand_count():
    from tools.attacks.base import attack_rates, wilson_interval

    # Wilson (1927) at 95%, computed by hand from the formula (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) /
    # (1 + z^2/n), z = 1.96: 3 of 10 -> [0.1078, 0.6032]; 0 of 10 -> [0, 0.2775]; 10 of 10 -> [0.7225, 1].
    assert wilson_interval(3, 10) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) == (None, None)
    # 8 cases: 2 succeed unattacked; of the 6 attacked, 3 succeed. A post verdict of a pre-success never counts
    # twice, and a pre-success's own post verdict does not matter (check_asr.py counts it as a success).
    pre = [True, True, False, False, False, False, False, False]
    post = [False, True, True, True, True, False, False, False]
    r = attack_rates(pre, post)
    assert r["pre_asr"]["successes"] == 2 and r["pre_asr"]["n"] == 8 and r["pre_asr"]["rate"] == 0.25
    assert r["asr"]["successes"] == 5 and r["asr"]["rate"] == 5 / 8
    assert r["attack_only"]["successes"] == 3 and r["attack_only"]["n"] == 6
    assert r["asr"]["ci95"] == pytest.approx(list(wilson_interval(5, 8)))
    assert r["asr"]["ci95"] == pytest.approx([0.30574, 0.86316], abs=1e-5)  # 5/8 by hand from the formula


def test_summary_counts_the_records(toy_run):
    """summary.json's figures are the records' counts: pre-successes, pre + attack successes, held-out images."""
    recs, s = toy_run["records"], toy_run["summary"]
    assert [r["case_number"] for r in recs] == list(range(FOUR))
    pre = sum(r["pre_success"] for r in recs)
    post = sum(r["pre_success"] or r["post_success"] for r in recs)
    held = [x for r in recs for x in r["heldout_successes"]]
    assert pre == 2  # the fixture's threshold splits the unattacked cases 2 / 2
    assert (s["n"], s["pre_asr"]["successes"], s["asr"]["successes"]) == (FOUR, pre, post)
    assert s["heldout_asr"]["n"] == 2 * FOUR and s["heldout_asr"]["successes"] == sum(held)
    from tools.attacks.base import wilson_interval

    assert s["asr"]["ci95"] == pytest.approx(list(wilson_interval(post, FOUR)))
    assert s["judge"]["criterion"] == "clip" and s["judge"]["success_when"].startswith("score >")
    # Pre-successes are not attacked and keep their prompt; attacked cases carry the toy's tokens.
    for r in recs:
        assert r["attacked"] == (not r["pre_success"])
        if not r["attacked"]:
            assert r["adv_prompt"] == r["prompt"] and r["adv_token_ids"] == [] and r["step"] is None
        else:
            assert len(r["adv_token_ids"]) == 2 and r["adv_prompt"].endswith(r["prompt"])
            assert (r["step"] is not None) == r["post_success"] and 1 <= r["steps_run"] <= 3
        assert len(r["heldout_seeds"]) == 2 and r["seed"] not in r["heldout_seeds"]
    # The files: the replay CSV (one row per case), images before (every case) and after (attacked cases).
    out = toy_run["out"]
    rows = list(csv.DictReader(open(os.path.join(out, "adv_prompts.csv"))))
    assert [r["prompt"] for r in rows] == [r["adv_prompt"] for r in recs]
    assert [int(r["evaluation_seed"]) for r in rows] == [r["seed"] for r in recs]
    assert sorted(os.listdir(os.path.join(out, "images", "pre"))) == [f"{k:05d}.png" for k in range(FOUR)]
    assert len(os.listdir(os.path.join(out, "images", "post"))) == FOUR - pre
    assert len(os.listdir(os.path.join(out, "images", "heldout"))) == 2 * FOUR
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["attack"] == "toy" and config["settings"] == {"num_tokens": 2, "toy_tries": 3}
    assert "numeric_environment" in config and config["num_processes"] == 1


# ---- resume, processes, replay ------------------------------------------------------------------------------------


def test_resume_after_a_kill_at_case_2_of_4_gives_the_same_records(assets, toy, toy_run, tmp_path):
    out = str(tmp_path / "killed")
    proc = run(assets, toy, "toy", out, env={"REVIVAL_FAULT": "case:3"}, expect=-9)  # SIGKILL before case 3
    assert proc.returncode == -9
    assert [r["case_number"] for r in records(out)] == [0, 1]
    assert not os.path.exists(os.path.join(out, "summary.json"))
    summary = run(assets, toy, "toy", out)
    assert timeless(records(out)) == timeless(toy_run["records"])
    ref = toy_run["summary"]
    for key in ("n", "pre_asr", "asr", "heldout_asr", "attack_only", "judge", "settings"):
        assert summary[key] == ref[key], key
    assert open(os.path.join(out, "adv_prompts.csv")).read() == open(os.path.join(toy_run["out"],
                                                                                 "adv_prompts.csv")).read()
    assert "resuming at case 2" in open(os.path.join(out, "log.txt")).read()
    # Continuing with other settings is refused (one line, exit 2), the results untouched.
    before = open(os.path.join(out, "results.jsonl")).read()
    proc = run(assets, toy, "toy", out, expect=2, **{"--heldout_seeds": 1})
    assert "other settings" in proc.stderr and "--heldout_seeds" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert open(os.path.join(out, "results.jsonl")).read() == before


@pytest.mark.slow
@pytest.mark.two_processes
def test_two_processes_give_the_records_of_one(assets, toy, toy_run, tmp_path):
    out = str(tmp_path / "two")
    summary = run(assets, toy, "toy", out, processes=2)
    assert summary["num_processes"] == 2  # not two processes each alone (PartialState without cpu=True)
    assert timeless(records(out)) == timeless(toy_run["records"])
    for key in ("pre_asr", "asr", "heldout_asr"):
        assert summary[key] == toy_run["summary"][key]


def test_replay_of_a_run_csv_reproduces_its_post_attack_scores(assets, toy, toy_run, tmp_path):
    out = str(tmp_path / "replay")
    summary = run(assets, toy, "replay", out, **{"--prompts": os.path.join(toy_run["out"], "adv_prompts.csv")})
    replayed, attacked = records(out), toy_run["records"]
    assert [r["case_number"] for r in replayed] == [r["case_number"] for r in attacked]
    assert [r["seed"] for r in replayed] == [r["seed"] for r in attacked]
    assert [r["pre_score"] for r in replayed] == [r["post_score"] for r in attacked]
    assert [r["pre_success"] for r in replayed] == [r["post_success"] for r in attacked]
    # The same prompts on the same seeds: the held-out verdicts too; the replay's ASR is the attack's.
    assert [r["heldout_scores"] for r in replayed] == [r["heldout_scores"] for r in attacked]
    assert summary["asr"] == toy_run["summary"]["asr"] and summary["pre_asr"] == summary["asr"]


# ---- bad input ----------------------------------------------------------------------------------------------------


def _refused(capsys, argv, expected):
    """parse_args exits 2 with one line holding ``expected``."""
    from tools import attack_prompts

    with pytest.raises(SystemExit) as err:
        attack_prompts.parse_args(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    return lines[0]


@pytest.fixture
def toy_registered(toy, monkeypatch):
    """The toy search registered in this process."""
    import sys

    from tools import attacks

    monkeypatch.syspath_prepend(str(toy["root"]))
    monkeypatch.setitem(attacks.MODULES, "toy", ("toyattacks.search", {}))
    yield
    sys.modules.pop("toyattacks.search", None)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(assets, toy, toy_registered, tmp_path, capsys,
                                                         in_assets_root):
    out = str(tmp_path / "never")
    def argv(attack="toy", threshold=0.5, **over):
        return flags(assets, toy, attack, out, threshold=threshold, **over)

    _refused(capsys, argv("unlearndiffatk"), "--target_images")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, argv("unlearndiffatk", **{"--target_images": str(empty)}), "no images")
    _refused(capsys, argv("p4d-n"), "--original_model")
    _refused(capsys, argv("p4d-k", **{"--original_model": str(tmp_path / "nowhere")}), "--original_model")
    _refused(capsys, argv(**{"--num_tokens": 0}), "--num_tokens 0: must be at least 1")
    images = tmp_path / "targets"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "0.png")
    _refused(capsys, argv("unlearndiffatk", **{"--target_images": str(images), "--num_tokens": 76}),
             "--num_tokens 76: at most 75")
    no_prompt = tmp_path / "adv.csv"
    no_prompt.write_text("text,case_number\na red circle,0\n")
    _refused(capsys, argv(**{"--prompts": str(no_prompt)}), "no 'prompt' column")
    _refused(capsys, argv(threshold=False), "needs --clip_threshold")
    _refused(capsys, argv(**{"--criterion": "classifier", "--model_path": assets["classifier"]}),
             "needs --bc_threshold")
    _refused(capsys, argv(**{"--criterion": "classifier"}), "needs --model_path")
    _refused(capsys, argv("ringabell"), "--pairs_file")
    assert not os.path.exists(out)


# ---- flags shared by several attacks --------------------------------------------------------------------------------


def test_a_shared_flag_takes_the_chosen_attack_s_default_and_its_help_names_each_attack_s():
    """Parse only: --lr, --judge_every, --num_tokens default per attack (a given value wins), and --help shows each
    attack's own help and default for them."""
    from tools import attack_prompts as ap

    required = ["--pretrained_model_name_or_path", "m", "--prompts", "p.txt", "--criterion", "clip",
                "--output_dir", "o"]

    def settings(attack, *extra):
        return ap.attack_settings(ap.build_parser().parse_args(["--attack", attack, *required, *extra]))

    udatk, p4dn, ring = settings("unlearndiffatk"), settings("p4d-n"), settings("ringabell")
    assert (udatk["lr"], udatk["judge_every"], udatk["num_tokens"]) == (0.01, 1, 5)
    assert (p4dn["lr"], p4dn["judge_every"], p4dn["num_tokens"]) == (0.1, 50, 16)
    assert ring["num_tokens"] == 16 and "lr" not in ring
    assert settings("p4d-k", "--lr", "0.5")["lr"] == 0.5 and settings("unlearndiffatk", "--num_tokens", "3")[
        "num_tokens"] == 3
    helps = {a.dest: a.help for a in ap.build_parser()._actions}
    assert "unlearndiffatk: adversarial tokens k" in helps["num_tokens"] and "default 5;" in helps["num_tokens"]
    assert "p4d-n/p4d-k: P4D-N: free learned tokens" in helps["num_tokens"]
    assert "ringabell: Ring-A-Bell: K" in helps["num_tokens"] and "length 75), default 16;" in helps["num_tokens"]
    assert "random: random tokens k" in helps["num_tokens"] and helps["num_tokens"].endswith("default 5")
    assert "unlearndiffatk: Adam learning rate" in helps["lr"] and "p4d-n/p4d-k: AdamW learning rate" in helps["lr"]
    assert "default 0.01;" in helps["lr"] and helps["lr"].endswith("default 0.1")
    assert helps["timesteps"].endswith("(default 50)")  # a flag of one attack: its help as written


def test_the_command_itself_in_a_new_interpreter_gives_the_probe_s_records(assets, toy, tmp_path):
    """tools/attack_prompts.py run directly, as users run it, in a new interpreter (the fresh lane; the other tests
    go through the launcher that registers the toy search): the built-in replay gives the fixture's probe records."""
    out = str(tmp_path / "probe")
    proc = launch("tools/attack_prompts.py", flags(assets, toy, "replay", out, threshold=-1.0), cwd=assets["root"],
                  env_extra=THREADS, fresh=True)
    assert proc.returncode == 0 and "zygote" not in proc.how, proc.stderr[-3000:]
    assert timeless(records(out)) == timeless(records(str(toy["root"] / "probe")))


def test_a_run_written_before_a_flag_existed_continues_while_the_flag_is_at_its_default():
    from tools import attack_prompts as ap

    parser = ap.build_parser()
    old = {"attack": "p4d-k", "heldout_seeds": 3, "quiet": True}  # config.json of a version without the newer flags
    new = {"attack": "p4d-k", "heldout_seeds": 3, "quiet": False, "long_prompts": None, "q16_or_nudenet": False}
    assert ap.changed_flags(old, new, parser) == []  # --quiet is free; the added flags are at their defaults
    assert ap.changed_flags(old, {**new, "long_prompts": "chunks"}, parser) == ["long_prompts"]
    assert ap.changed_flags(old, {**new, "heldout_seeds": 1}, parser) == ["heldout_seeds"]
    assert ap.changed_flags({**old, "long_prompts": "chunks"}, new, parser) == ["long_prompts"]  # known, changed
