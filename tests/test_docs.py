"""The documentation that is generated or quoted from the code stays current, and the README stays a short
entry point to the pages under docs/."""

import json
import re

from conftest import ROOT


def test_flags_reference_is_generated_from_the_parsers():
    from tools import flags_reference as flags

    text = flags.render()
    assert text == (ROOT / "docs" / "flags.md").read_text(), \
        "docs/flags.md is not current: run .venv/bin/python tools/flags_reference.py and commit it"
    # Every flag of every program is in it, with its default (a renamed or new flag changes the file).
    for program in flags.PROGRAMS:
        for action in flags.load_parser(program)._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in text, (program, option)
    section = text.split("## `finetuning_sequential.py`")[1].split("## `eval_model.py`")[0]
    assert "| `--seed` | `0` |" in section and "| `--output_dir` | `sd-model-finetuned` |" in section
    assert "| `--params` {full,xattn,lora} | `full` |" in section
    assert "|  |" not in text  # no flag without an explanation


def test_the_readme_is_read_in_five_minutes():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move a section to a page under docs/"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/([^)#\s]+\.md)(?:#[^)]*)?\)", readme))
    pages = {page.name for page in (ROOT / "docs").glob("*.md")}
    assert pages, "no pages found: the pattern is wrong"
    assert pages <= linked, f"pages the README does not link: {sorted(pages - linked)}"


def test_the_flags_reference_command_checks_in_a_new_interpreter():
    """tools/flags_reference.py --check as a new interpreter (the fresh lane): exit 0, docs/flags.md current."""
    from conftest import launch

    proc = launch("tools/flags_reference.py", ["--check"], cwd=str(ROOT), fresh=True)
    assert proc.returncode == 0 and "zygote" not in proc.how, proc.stdout[-2000:] + proc.stderr[-2000:]


def _demo_figures() -> dict:
    return json.loads((ROOT / "tools" / "toy_world" / "expected_demo.json").read_text())["sections"]["demo"]["figures"]


def test_outputs_md_examples_are_the_demo_s_figures():
    """docs/outputs.md quotes make demo's log and evaluation table: every figure there that the demo's expected
    figures hold must equal them, so a changed demo cannot leave the page stale (it was, by three demo changes)."""
    text = (ROOT / "docs" / "outputs.md").read_text()
    figures = _demo_figures()
    related = "revival_table: esd-x a red circle related"
    # The log: thresholds, the chunk means that the evaluation of the same checkpoints repeats, the Revival Points.
    means = re.findall(r"INFO after chunk (\d) \(\d+ images\): (clip|classifier) mean ([\d.]+) \(threshold ([\d.]+)\)",
                       text)
    assert len(means) == 4
    for chunk, criterion, mean, threshold in means:
        assert threshold == figures[f"{related} {criterion} / threshold"]
        key = "clip_cosine" if criterion == "clip" else "classifier_accuracy"
        assert mean == figures[f"eval: seq-esd-x-related/curriculum-{chunk} / {key}"], (chunk, criterion)
    for criterion, chunk, images in re.findall(r"INFO Revival Point \((\w+)\): chunk (\d+), (\d+) images", text):
        assert figures[f"{related} {criterion} / Revival Point"] == f"chunk {chunk} ({images} images)"
    assert re.findall(r"clip mean [\d.]+ \(threshold ([\d.]+)\) -> not revived", text) == \
        [figures["revival_table: uce a red circle related clip / threshold"]]
    # The evaluation's table.
    rows = re.findall(r"^    (\S+) +(single|trained) +([\d.]+) +([\d.]+) +([\d.]+)$", text, re.M)
    assert [r[0] for r in rows] == ["sd_base", "esd-x", "uce", "seq-esd-x-related",
                                    "seq-esd-x-related/curriculum-4", "seq-esd-x-related/curriculum-9"]
    for label, _, cosine, logit, accuracy in rows:
        assert cosine == figures[f"eval: {label} / clip_cosine"], label
        assert float(logit) == round(float(figures[f"eval: {label} / clip_logit_scale"]), 2), label
        assert float(accuracy) == round(float(figures[f"eval: {label} / classifier_accuracy"]), 3), label
