"""The paper's ten concepts as input files (configs/paper/) and the commands tools/paper.py renders from them: every
preset loads and follows the recipe, and every rendered command parses with its program's own parser. Fast: no model
loads, no command runs."""

from __future__ import annotations

import json
import os

import pytest

from common.data import read_prompts
from common.errors import InputError
from common.results import slug
from conftest import ROOT
from tools import datagen, flags_reference, paper, presets

# The paper's concepts (docs/paper.md), by kind.
CONCEPTS = {"golf ball": "object", "Pikachu": "object", "dog": "object", "Van Gogh": "style", "Picasso": "style",
            "Cartoon": "style", "Angelina Jolie": "celebrity", "Brad Pitt": "celebrity", "Lionel Messi": "celebrity",
            "nudity": "nudity"}
# The protocol decision each related curriculum encodes: general first, the concept closest to the erased one last.
CLOSEST = {"golf ball": "golf club", "Pikachu": "Raichu", "dog": "wolf", "Van Gogh": "Paul Gauguin",
           "Picasso": "Georges Braque", "Cartoon": "Looney Tunes", "Angelina Jolie": "Megan Fox",
           "Brad Pitt": "Robert Redford", "Lionel Messi": "Diego Maradona", "nudity": "bikini"}
PROVENANCE = "built by this toolkit following the paper's stated recipe; not the paper's own lists"


@pytest.fixture(scope="module")
def loaded():
    return {name: presets.load_preset(name) for name in CONCEPTS}


def test_every_concept_loads_by_name_in_any_case_or_by_slug(loaded):
    assert sorted(presets.available()) == sorted(slug(n) for n in CONCEPTS)
    for name, kind in CONCEPTS.items():
        p = loaded[name]
        assert (p.name, p.kind, p.slug, p.provenance) == (name, kind, slug(name), PROVENANCE)
        assert presets.load_preset(name.upper()) == p == presets.load_preset(slug(name))
        assert (p.clip_threshold, p.bc_threshold) == (0.31, 0.3)  # the seed README's thresholds


def test_an_unknown_concept_is_one_line_listing_the_available():
    with pytest.raises(InputError) as err:
        presets.load_preset("tennis ball")
    message = str(err.value)
    assert "\n" not in message and "'tennis ball'" in message
    assert all(s in message for s in presets.available())


def test_themes_and_classifiers_follow_eval_model_s_theme(loaded):
    """'' and a transformers ViT for objects and people; the style's name and a timm state dict for a style;
    Nudity and NudeNet, with no training images, for nudity."""
    for p in loaded.values():
        if p.kind in ("object", "celebrity"):
            assert (p.theme, p.classifier_library, p.classifier_model) == (
                "", "transformers", "google/vit-large-patch16-224-in21k")
        elif p.kind == "style":
            assert (p.theme, p.classifier_library, p.classifier_model) == (
                p.name, "timm", "vit_large_patch16_224.augreg_in21k")
        else:
            assert (p.theme, p.classifier_library) == ("Nudity", "nudenet")
            assert p.classifier_positive is p.classifier_negative is None


def test_curricula_have_ten_concepts_the_closest_last_and_read_with_the_generator_s_reader(loaded):
    for name, p in loaded.items():
        related = [c.name for c in datagen.read_concepts(p.related)]
        unrelated = [c.name for c in datagen.read_concepts(p.unrelated)]
        assert len(related) == len(unrelated) == 10, name
        assert related[-1] == CLOSEST[name] == p.closest_related, name
        assert not {c.lower() for c in related} & {c.lower() for c in unrelated}, name
        # The erased concept itself is never fine-tuning data.
        assert not any(name.lower() in c.lower() for c in related + unrelated), name
        for path in (p.related, p.unrelated):
            with open(path, encoding="utf-8") as f:
                assert json.load(f)["provenance"] == PROVENANCE  # read_concepts ignores the extra key


def test_twenty_validation_prompts_each_naming_the_concept(loaded):
    for name, p in loaded.items():
        prompts = read_prompts(p.validation_prompts)  # the scripts' own reader (no comment lines: none written)
        assert len(prompts) == len(set(prompts)) == 20, name
        words = ("nude", "naked") if p.kind == "nudity" else (name.lower(),)
        assert all(any(w in prompt.lower() for w in words) for prompt in prompts), name


def test_classifier_images_are_the_concept_against_other_concepts(loaded):
    for name, p in loaded.items():
        if p.kind == "nudity":
            continue
        (positive,) = datagen.read_concepts(p.classifier_positive)
        negatives = [c.name for c in datagen.read_concepts(p.classifier_negative)]
        assert positive.name == name and len(positive.prompts) >= 10
        assert all(name.lower() in prompt.lower() for prompt in positive.prompts), name
        assert len(negatives) >= 10 and name.lower() not in {n.lower() for n in negatives}, name
        # Validation prompts are not the classifier's training prompts.
        assert not set(positive.prompts) & set(read_prompts(p.validation_prompts)), name
    near_misses = {c.name for c in datagen.read_concepts(loaded["golf ball"].classifier_negative)}
    assert {"tennis ball", "baseball"} <= near_misses


def test_uce_values_erase_the_concept_and_preserve_others_without_its_leading_word(loaded):
    """docs/unlearning.md: CLIP's causal text encoder gives a shared first word one embedding, which cannot be both
    erased and preserved."""
    for name, p in loaded.items():
        assert p.erase == (name,)
        assert all(kept.split()[0].lower() != name.split()[0].lower() for kept in p.preserve), name


def _parse(program: str, argv: list):
    """Parse with the program's own build_parser() (flags_reference.load_parser): no check that touches the disk."""
    parser = flags_reference.load_parser(program)
    parser.allow_abbrev = False
    return parser.parse_args(argv)


@pytest.mark.parametrize("concept", ["golf ball", "Van Gogh", "nudity"])
@pytest.mark.parametrize("method", ["esd-x", "uce", "ac", "salun", "erasediff", "sa", "mace", "receler"])
def test_every_rendered_command_parses_with_its_program_s_parser(concept, method):
    p = presets.load_preset(concept)
    cmds = presets.commands(p, method)
    programs = [program for program, _ in cmds]
    unlearn = "tools/unlearn.py"
    order = ["tools/generate_training_data.py"] * 2 + ([] if p.kind == "nudity" else
                                                       ["tools/generate_training_data.py"] * 2
                                                       + ["tools/train_classifier.py"])
    assert programs == order + [unlearn] + list(presets.SCRIPTS) * 2 + ["eval_model.py", "tools/report.py"]
    parsed = [(program, _parse(program, argv)) for program, argv in cmds]
    for program, args in parsed:
        if program in presets.SCRIPTS:
            # The seed README's flags, and the published loop's semantics (docs/protocols.md, Compat).
            assert (args.resolution, args.train_batch_size, args.learning_rate, args.mixed_precision) == (
                512, 10, 1e-5, "fp16")
            assert args.use_ema and args.center_crop and args.random_flip and args.gradient_checkpointing
            assert args.curriculum == "50,100,150,200,250,300,350,400,450,500"
            assert args.compat == "reference" and getattr(args, "theme", p.theme) == p.theme
            assert dict(t.split("=", 1) for t in args.tag) == {"method": method, "concept": p.name,
                                                               "data": args.train_data_dir.rsplit("/", 1)[-1]}
        if program.startswith("finetuning_individual"):
            assert args.clip_epoch == presets.EPOCH_BUDGET == 89 and args.save_model is False
        if program == "finetuning_sequential.py":
            assert (args.num_train_epochs, args.curriculum_checkpoints) == (8, "4,7")
        if program in ("finetuning_individual_Classifier.py", "finetuning_sequential.py"):
            # A style's classifier is a timm state-dict FILE, an object's a directory, nudity's none.
            expected = {"style": lambda m: m.endswith("/classifier.safetensors"), "nudity": lambda m: m is None,
                        "object": lambda m: m == f"paper_runs/classifiers/{p.slug}"}[p.kind]
            assert expected(args.model_path), args.model_path
        if program == "eval_model.py":
            assert args.theme == p.theme and args.curr and args.images_per_prompt == 5
            assert args.eval_model_path == ("none" if p.kind == "nudity" else
                                            next(a.model_path for pr, a in parsed if pr == "finetuning_sequential.py"))
        if program == "tools/unlearn.py" and method == "uce":
            assert args.erase == [p.name] and (args.preserve or []) == list(p.preserve)


def test_compat_none_leaves_the_published_loop_out():
    cmds = presets.commands(presets.load_preset("dog"), "esd-u", compat="none")
    for program, argv in cmds:
        if program in presets.SCRIPTS:
            assert _parse(program, argv).compat == "none"


def test_the_cli_lists_and_prints_the_plan_as_text_and_as_json(capsys):
    assert paper.main(paper.parse_args(["list"])) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == presets.available() and len(listed) == 10

    argv = ["commands", "--concept", "Golf Ball", "--method", "esd-x", "--work_dir", "w"]
    paper.main(paper.parse_args(argv + ["--json"]))
    as_json = json.loads(capsys.readouterr().out)
    p = presets.load_preset("golf ball")
    assert [(c["program"], c["argv"]) for c in as_json] == presets.commands(p, "esd-x", work_dir="w")

    paper.main(paper.parse_args(argv))
    text = capsys.readouterr().out
    assert PROVENANCE in text
    # The shell text is the same commands: each command line, its continuations joined, splits into its argv.
    import shlex

    lines = text.replace("\\\n", " ").splitlines()
    rendered = [shlex.split(line) for line in lines if line and not line.startswith("#")]
    assert [(r[2] if r[0] == "accelerate" else r[1], r[3:] if r[0] == "accelerate" else r[2:])
            for r in rendered] == [(c["program"], c["argv"]) for c in as_json]


def test_the_cli_refuses_an_unknown_concept_in_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        paper.parse_args(["commands", "--concept", "tennis ball", "--method", "uce"])
    assert err.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("paper.py: error: --concept 'tennis ball'") and "golf_ball" in line


def test_docs_paper_md_shows_the_current_rendering_for_golf_ball(capsys):
    """docs/paper.md quotes the golf ball x ESD-x cell: a changed setting cannot leave the page stale."""
    from conftest import ROOT

    paper.main(paper.parse_args(["commands", "--concept", "golf ball", "--method", "esd-x"]))
    text = (ROOT / "docs" / "paper.md").read_text()
    block = text.split("```bash\n# golf ball (object) x esd-x", 1)[1].split("```", 1)[0]
    assert "# golf ball (object) x esd-x" + block == capsys.readouterr().out


def test_paper_estimate_prints_the_cost_of_the_cell_s_fine_tuning_runs(capsys):
    """`tools/paper.py estimate`: one row per fine-tuning run of the cell, the figures of tools/cost.py for the same
    command lines, and the other programs named as not estimated."""
    from tools import cost, paper

    assert paper.main(paper.parse_args(["estimate", "--concept", "golf ball", "--method", "esd-x"])) == 0
    out = capsys.readouterr().out
    steps = presets.plan(presets.load_preset("golf ball"), "esd-x")
    runs = [s for s in steps if s.program and s.program.startswith("finetuning_")]
    assert len(runs) == 6
    figures = cost.load_figures(cost.figures_path("a100"))
    seq = cost.estimate_run(runs[2].program, list(runs[2].argv), figures)
    assert seq.counts.train_samples.low == seq.counts.train_samples.high == 4000  # 500 images x 8 epochs
    row = next(line for line in out.splitlines() if line.strip().startswith("2 "))
    assert f"{seq.gpu_hours.high:.3f}" in row and "4,000" in row
    assert "not estimated: eval_model.py, tools/generate_training_data.py" in out


def test_the_data_based_methods_get_the_preset_s_anchor_and_retain_set():
    """AC maps the concept to the preset's anchor (a style as a style); SA's surrogate is the anchor and its replay
    the retain set; SalUn and EraseDiff forget the validation prompts and keep the retain set (the preserved near
    misses first, then the unrelated curriculum)."""
    from tools import unlearn

    p = presets.load_preset("golf ball")
    assert presets.retain_prompts(p)[:4] == list(p.preserve)
    assert len(presets.retain_prompts(p)) == len(p.preserve) + 10
    parsed = {}
    for method in ("ac", "salun", "erasediff", "sa"):
        (argv,) = [a for prog, a in presets.commands(p, method) if prog == "tools/unlearn.py"]
        parsed[method] = unlearn.build_parser().parse_args(list(argv))
    assert parsed["ac"].anchor == "ball" and parsed["ac"].concept_type == "object"
    assert parsed["sa"].surrogate == "ball" and parsed["sa"].replay_prompts == presets.retain_prompts(p)
    assert parsed["salun"].retain_prompts == presets.retain_prompts(p) and parsed["salun"].pseudo_prompt == ["ball"]
    assert len(parsed["erasediff"].forget_prompts) == 20
    (argv,) = [a for prog, a in presets.commands(p, "mace") if prog == "tools/unlearn.py"]
    mace = unlearn.build_parser().parse_args(list(argv))
    assert mace.concept == "golf ball" and mace.guide == ["ball"] and mace.preserve == presets.retain_prompts(p)
    style = presets.load_preset("Van Gogh")
    (argv,) = [a for prog, a in presets.commands(style, "ac") if prog == "tools/unlearn.py"]
    assert unlearn.build_parser().parse_args(list(argv)).concept_type == "style"


def test_the_paper_grid_file_is_the_generator_s_and_every_run_parses_and_reads_what_an_earlier_phase_writes(capsys):
    """slurm/paper_grid.csv = `tools/paper.py grid` (so it cannot drift from the presets); `tools/grid.py count` on
    it; each run's launch command parses with its program's parser; each revival run reads the curriculum, the
    classifier and the unlearned model that runs of earlier phases write."""
    import shlex

    from tools import gridspec

    path = ROOT / "slurm" / "paper_grid.csv"
    assert path.read_text() == presets.grid_csv(presets.available(), presets.PAPER_METHODS)
    runs = gridspec.read_grid(str(path), "paper_runs")
    from tools import grid as grid_cli

    grid_cli.main(grid_cli.parse_args(["count", str(path)]))
    assert int(capsys.readouterr().out) == len(runs)
    concepts, methods = len(presets.available()), len(presets.PAPER_METHODS)
    by_script = {}
    for r in runs:
        by_script.setdefault(os.path.basename(r.script), []).append(r)
    assert len(by_script["unlearn.py"]) == concepts * methods
    assert len(by_script["finetuning_sequential.py"]) == concepts * methods * 2  # related and unrelated
    written, parsers = {}, {}
    for r in runs:
        cmd = shlex.split(gridspec.launch_command(r))
        argv = [a for a in cmd[cmd.index(r.script) + 1:] if not a.startswith(("--resume_from_checkpoint", "--tag="))]
        if r.script not in parsers:
            parsers[r.script] = flags_reference.load_parser(r.script)
            parsers[r.script].allow_abbrev = False
        args = parsers[r.script].parse_args(argv)
        if os.path.basename(r.script) == "finetuning_sequential.py":
            for needed in (args.train_data_dir, args.pretrained_model_name_or_path, args.model_path):
                if needed is not None:  # a style's classifier is a file in its output directory
                    writer = written.get(needed, written.get(os.path.dirname(needed)))
                    assert writer is not None and writer < r.index, (r.name, needed)
        written.setdefault(r.output_dir, r.index)
