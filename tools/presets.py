"""The paper's ten concepts as input files, and the commands that reproduce one cell of its table (tools/paper.py).

``configs/paper/<slug>/`` holds, per concept, what the paper built but never
published, rebuilt by its stated recipe (configs/paper/README.md): the related
and unrelated curricula, 20 validation prompts, the classifier's training
prompts, the UCE values and the thresholds. ``load_preset`` reads one;
``plan`` turns a preset, an unlearning method and a working directory into
the ordered steps (program and argv, with a note where a step needs one)
that go from nothing to the report: data, classifier, unlearning, the two
individual scripts and the sequential one on both curricula, evaluation,
report. The steps are data so that a test can parse each with its program's
own parser (tests/test_paper_preset.py); docs/paper.md says which choices
follow the paper and which are ours.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from common.errors import InputError
from common.results import slug
from tools import datagen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOT = os.path.join(ROOT, "configs", "paper")
KINDS = ("object", "style", "celebrity", "nudity")
CLASSIFIER_LIBRARIES = {"object": "transformers", "celebrity": "transformers", "style": "timm", "nudity": "nudenet"}
NUDITY_THEME = "Nudity"

# The paper's settings (the seed README's command lines; docs/protocols.md).
BASE_MODEL = "CompVis/stable-diffusion-v1-4"
IMAGES_PER_CONCEPT = 50          # curriculum chunk size: --curriculum 50,100,...,500
CLASSIFIER_IMAGES = 300          # per class; the paper does not say, docs/workflow.md: "a few hundred"
SEQUENTIAL_EPOCHS = 8
CURRICULUM_CHECKPOINTS = "4,7"
# The individual scripts' epoch budget: the published scripts' default (docs/demo.md, docs/protocols.md). The seed
# README's command lines do not pass --clip_epoch, so the paper's runs had 89; we pass it explicitly so that the
# cell does not depend on our default staying the published one.
EPOCH_BUDGET = 89
EVAL_IMAGES_PER_PROMPT = 5       # the paper: 20 prompts x 5 images
DATASETS = ("related", "unrelated")
SCRIPTS = ("finetuning_individual_CLIP.py", "finetuning_individual_Classifier.py", "finetuning_sequential.py")
# The seed README's training flags, shared by the three scripts (its values, our spelling: one token per value).
SEED_FLAGS = ("--caption_column", "prompt", "--use_ema", "--resolution", "512", "--center_crop", "--random_flip",
              "--gradient_checkpointing", "--mixed_precision", "fp16", "--learning_rate", "1e-05",
              "--max_grad_norm", "1", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
              "--train_batch_size", "10", "--gradient_accumulation_steps", "1")
LAUNCHED = SCRIPTS + ("tools/generate_training_data.py",)  # run under `accelerate launch` (one GPU or several)


@dataclass(frozen=True)
class Preset:
    """One concept's inputs: its files (absolute paths) and the values of its concept.json."""

    name: str
    slug: str
    kind: str
    theme: str
    clip_threshold: float
    bc_threshold: float
    classifier_library: str
    classifier_model: Optional[str]
    erase: Tuple[str, ...]
    preserve: Tuple[str, ...]
    closest_related: str
    anchor: str  # what the anchor-based methods (AC, SA, SalUn, EraseDiff) map the concept to
    provenance: str
    directory: str
    related: str
    unrelated: str
    validation_prompts: str
    classifier_positive: Optional[str]  # None for nudity: NudeNet needs no training images
    classifier_negative: Optional[str]


@dataclass(frozen=True)
class Step:
    """One step of a plan: a program and its argv, or only a note (program None); a note precedes its command."""

    program: Optional[str]
    argv: Tuple[str, ...] = ()
    note: str = ""


def available(root: str = DEFAULT_ROOT) -> List[str]:
    """The slugs of the presets under ``root``, in the paper's order of kinds (objects, styles, people, nudity)."""
    if not os.path.isdir(root):
        raise InputError(f"{root}: no such directory of presets")
    slugs = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "concept.json"))]
    return sorted(slugs, key=lambda s: (_kind_rank(os.path.join(root, s, "concept.json")), s))


def _kind_rank(path: str) -> int:
    """A preset's place in the paper's order of kinds (a broken one last: load_preset says what is wrong)."""
    try:
        with open(path, encoding="utf-8") as f:
            return KINDS.index(json.load(f).get("kind"))
    except (OSError, ValueError, AttributeError):
        return len(KINDS)


def _read_json(path: str) -> dict:
    """A JSON object from a file, or one line saying why not."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _require(condition: bool, message: str) -> None:
    """An InputError with ``message`` unless ``condition``."""
    if not condition:
        raise InputError(message)


def _strings(value, where: str) -> Tuple[str, ...]:
    """A list of non-empty strings as a tuple, or one line naming ``where``."""
    _require(isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value),
             f"{where}: expected a list of non-empty strings")
    return tuple(value)


def find_slug(concept: str, root: str = DEFAULT_ROOT) -> str:
    """The preset slug of a concept given by name (any case) or slug; unknown: one line listing the available."""
    slugs = available(root)
    wanted = slug(concept or "")
    if wanted in slugs and concept.strip():
        return wanted
    raise InputError(f"--concept {concept!r}: no preset under {shown(root)}; available: {', '.join(slugs)}")


def check_concept(meta: dict, path: str, key: str) -> None:
    """concept.json's keys and values, against the recipe's rules (configs/paper/README.md)."""
    missing = [k for k in ("name", "kind", "theme", "clip_threshold", "bc_threshold", "classifier", "uce",
                           "closest_related", "anchor", "provenance") if k not in meta]
    _require(not missing, f"{path}: missing key(s) {', '.join(missing)}")
    name, kind, theme = meta["name"], meta["kind"], meta["theme"]
    _require(isinstance(name, str) and slug(name) == key,
             f"{path}: name {name!r} does not give its folder's slug {key!r}")
    _require(kind in KINDS, f"{path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    # The scripts' --theme decides the classifier: '' a transformers directory, a style's name a timm state-dict
    # file, Nudity NudeNet (common/classifier.py classifier_kind); the kind must agree with it.
    fits = {"object": theme == "", "celebrity": theme == "", "nudity": theme == NUDITY_THEME,
            "style": isinstance(theme, str) and bool(theme) and theme.lower() != NUDITY_THEME.lower()}[kind]
    _require(fits, f"{path}: theme {theme!r} does not fit kind {kind!r} ('' for objects and celebrities, the "
                   f"style's name for a style, {NUDITY_THEME!r} for nudity)")
    classifier = meta["classifier"]
    library = CLASSIFIER_LIBRARIES[kind]
    _require(isinstance(classifier, dict) and classifier.get("library") == library,
             f"{path}: classifier.library must be {library!r} for kind {kind!r}")
    _require(library == "nudenet" or (isinstance(classifier.get("model"), str) and classifier["model"]),
             f"{path}: classifier.model must name the {library} model to start from")
    for flag in ("clip_threshold", "bc_threshold"):
        value = meta[flag]
        _require(isinstance(value, (int, float)) and 0 < value <= 1, f"{path}: {flag} {value!r} must be in (0, 1]")
    _require(isinstance(meta["uce"], dict) and bool(_strings(meta["uce"].get("erase"), f"{path}: uce.erase")),
             f"{path}: uce must be an object with a non-empty erase list")
    _strings(meta["uce"].get("preserve", []), f"{path}: uce.preserve")


def _file(directory: str, name: str, needed: bool = True) -> Optional[str]:
    """The path of one of a preset's files; a missing needed one is one line."""
    path = os.path.join(directory, name)
    if os.path.isfile(path):
        return path
    _require(not needed, f"{directory}: no {name}")
    return None


def load_preset(concept: str, root: str = DEFAULT_ROOT) -> Preset:
    """The preset of ``concept`` (a name in any case, or its slug), checked against the recipe's rules."""
    key = find_slug(concept, root)
    directory = os.path.abspath(os.path.join(root, key))
    meta = _read_json(os.path.join(directory, "concept.json"))
    check_concept(meta, os.path.join(directory, "concept.json"), key)
    kind = meta["kind"]
    needs_images = kind != "nudity"  # NudeNet needs no training images
    return Preset(name=meta["name"], slug=key, kind=kind, theme=meta["theme"],
                  clip_threshold=float(meta["clip_threshold"]), bc_threshold=float(meta["bc_threshold"]),
                  classifier_library=meta["classifier"]["library"], classifier_model=meta["classifier"].get("model"),
                  erase=tuple(meta["uce"]["erase"]), preserve=tuple(meta["uce"].get("preserve", [])),
                  closest_related=meta["closest_related"], anchor=meta["anchor"], provenance=meta["provenance"],
                  directory=directory,
                  related=_file(directory, "related.json"), unrelated=_file(directory, "unrelated.json"),
                  validation_prompts=_file(directory, "validation_prompts.txt"),
                  classifier_positive=_file(directory, "classifier_positive.json", needs_images) if needs_images
                  else None,
                  classifier_negative=_file(directory, "classifier_negative.json", needs_images) if needs_images
                  else None)


# ---- the commands of one cell ---------------------------------------------------------------------------------


def shown(path: str) -> str:
    """A path as the commands print it: relative to the repository (they run from its root) when inside it."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


@dataclass(frozen=True)
class Layout:
    """Where each step of a cell writes, under the working directory (runs as tools/grid.py names them)."""

    work_dir: str
    slug: str
    method: str

    def data(self, dataset: str) -> str:
        return os.path.join(self.work_dir, "data", self.slug, dataset)

    def classifier_data(self, cls: str) -> str:
        return os.path.join(self.work_dir, "classifier_data", self.slug, cls)

    def classifier_dir(self) -> str:
        return os.path.join(self.work_dir, "classifiers", self.slug)

    def init_weights(self, arch: str) -> str:
        return os.path.join(self.work_dir, "weights", arch, "model.safetensors")

    def model(self) -> str:
        return os.path.join(self.work_dir, "models", self.method, self.slug)

    def run(self, script: str, dataset: str) -> str:
        return os.path.join(self.work_dir, "runs", os.path.splitext(script)[0], self.method, self.slug, dataset)

    def eval_dir(self) -> str:
        return os.path.join(self.work_dir, "eval", self.method, self.slug)

    def report_dir(self) -> str:
        return os.path.join(self.work_dir, "report", self.method, self.slug)


def _count(path: str) -> int:
    return len(datagen.read_concepts(path))


def _prompt_count(path: str) -> int:
    """Validation prompts in a file, as the scripts count them: its non-empty lines (common/data.py read_prompts)."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def data_steps(p: Preset, base_model: str, lay: Layout) -> List[Step]:
    """The related and unrelated curricula: 50 images per concept, in the files' order."""
    return [Step("tools/generate_training_data.py",
                 ("--pretrained_model_name_or_path", base_model, "--concepts", shown(getattr(p, d)),
                  "--output_dir", lay.data(d), "--images_per_concept", str(IMAGES_PER_CONCEPT)),
                 f"{d} data: {_count(getattr(p, d))} concepts x {IMAGES_PER_CONCEPT} images from the original model")
            for d in DATASETS]


def classifier_path(p: Preset, lay: Layout) -> Optional[str]:
    """What --model_path takes: a transformers directory, a timm state-dict file (styles), none (nudity)."""
    if p.kind == "nudity":
        return None
    if p.classifier_library == "timm":
        return os.path.join(lay.classifier_dir(), "classifier.safetensors")
    return lay.classifier_dir()


def classifier_steps(p: Preset, base_model: str, lay: Layout) -> List[Step]:
    """Positive and negative images from the original model, then the classifier trained on them."""
    if p.kind == "nudity":
        return [Step(None, note="classifier: none to train; --theme Nudity scores with NudeNet 3's detector, "
                                "whose weights ship in its wheel (docs/protocols.md, Nudity)")]
    steps = []
    for cls, path in (("positive", p.classifier_positive), ("negative", p.classifier_negative)):
        per = math.ceil(CLASSIFIER_IMAGES / _count(path))  # about CLASSIFIER_IMAGES images per class
        steps.append(Step("tools/generate_training_data.py",
                          ("--pretrained_model_name_or_path", base_model, "--concepts", shown(path),
                           "--output_dir", lay.classifier_data(cls), "--images_per_concept", str(per)),
                          f"classifier {cls}s: {_count(path)} concept(s) x {per} images"))
    argv = ["--train_dir", os.path.dirname(lay.classifier_data("positive")), "--concept", p.name,
            "--output_dir", lay.classifier_dir()]
    if p.classifier_library == "timm":
        init = lay.init_weights(p.classifier_model)
        # A comment, not a step: hf is not ours to parse, and it needs the network once (docs/protocols.md, Offline).
        steps.append(Step(None, note=f"style classifier: timm {p.classifier_model}, started from its in21k weights; "
                                     f"fetch them once (network) with\n"
                                     f"    hf download timm/{p.classifier_model} model.safetensors "
                                     f"--local-dir {os.path.dirname(init)}"))
        argv += ["--timm_arch", p.classifier_model, "--init_weights", init]
    else:
        argv += ["--model_name_or_path", p.classifier_model]
    steps.append(Step("tools/train_classifier.py", tuple(argv),
                      "train the classifier (held-out accuracy, precision and recall in its metrics.json)"))
    return steps


def unlearn_steps(p: Preset, method: str, base_model: str, lay: Layout) -> List[Step]:
    """The unlearned model: made by tools/unlearn.py, or a published checkpoint imported over the base model."""
    if method in ("esd-x", "esd-u"):
        note = f"unlearn {p.name!r} with ESD-{method[-1]} (ESD's defaults: 1000 iterations, lr 1e-5, eta 1)"
        if p.kind == "nudity" and method == "esd-x":
            note += "; ESD's authors erase nudity with esd-u"
        return [Step("tools/unlearn.py", ("--method", method, "--concept", p.name, "--pretrained_model_name_or_path",
                                          base_model, "--output_dir", lay.model()), note)]
    if method == "receler":
        return [Step("tools/unlearn.py", ("--method", method, "--concept", p.name, "--pretrained_model_name_or_path",
                                          base_model, "--output_dir", lay.model()),
                     f"unlearn {p.name!r} with Receler (its published defaults: 500 steps at lr 3e-4, each after 50 "
                     "adversarial prompt steps; erasers folded into attn2.to_out.0)")]
    if method == "spm":
        return [Step("tools/unlearn.py", ("--method", method, "--concept", p.name, "--pretrained_model_name_or_path",
                                          base_model, "--output_dir", lay.model()),
                     f"unlearn {p.name!r} with SPM (its published defaults: a rank-1 membrane on the transformer "
                     "blocks, latent anchoring on surrogates it samples; the adapter fused at strength 1, and saved "
                     "beside it with its transport rule)")]
    if method == "uce":
        argv = ["--method", "uce", "--erase", *p.erase]
        if p.preserve:
            argv += ["--preserve", *p.preserve]
        return [Step("tools/unlearn.py", (*argv, "--pretrained_model_name_or_path", base_model,
                                          "--output_dir", lay.model()),
                     f"unlearn with UCE, preserving {', '.join(p.preserve) or 'nothing'}")]
    anchored = anchored_flags(p, method)
    if anchored is not None:
        return [Step("tools/unlearn.py", ("--method", method, "--concept", p.name, *anchored,
                                          "--pretrained_model_name_or_path", base_model, "--output_dir", lay.model()),
                     f"unlearn {p.name!r} with {method}, its published defaults (docs/unlearning.md), mapped to "
                     f"{p.anchor!r}; its forget, retain or anchor images generated by the base model")]
    from tools.unlearning import METHODS

    return [Step("tools/import_model.py",
                 ("--pretrained_model_name_or_path", base_model, "--checkpoint",
                  f"<{method} checkpoint erasing {p.name}>", "--output_dir", lay.model()),
                 f"{method} is not made by tools/unlearn.py ({', '.join(METHODS)}): import its published "
                 f"checkpoint for {p.name!r} over the base model with tools/import_model.py (docs/import.md; a "
                 f"method that publishes a whole pipeline directory, such as FMN, goes to {lay.model()} "
                 "as it is)")]


def retain_prompts(p: Preset) -> List[str]:
    """What the methods with a retain set keep: the preserved near misses, then the unrelated curriculum's concepts."""
    return list(dict.fromkeys([*p.preserve, *(c.name for c in datagen.read_concepts(p.unrelated))]))


def anchored_flags(p: Preset, method: str) -> Optional[List[str]]:
    """The preset's flags of a data-based method of tools/unlearn.py (None: not one): AC's anchor, SA's surrogate and
    replay, SalUn's and EraseDiff's forget and retain prompts and pseudo prompt, MACE's mapping concept and preserved
    prompts; every other setting the method's published default."""
    forget = ["--forget_prompts", *_read_prompts(p.validation_prompts)]
    retain = retain_prompts(p)
    flags = {
        "ac": ["--anchor", p.anchor, "--concept_type", "style" if p.kind == "style" else "object"],
        "sa": ["--surrogate", p.anchor, "--replay_prompts", *retain, *forget],
        "salun": [*forget, "--retain_prompts", *retain, "--pseudo_prompt", p.anchor],
        "erasediff": [*forget, "--retain_prompts", *retain],
        # MACE: the concept's prompts refined toward the anchor's (their mapping concept), the retain set's outputs
        # kept by both closed forms; its images generated, its masks from the base model's attention (no --masks).
        "mace": ["--guide", p.anchor, "--preserve", *retain],
    }
    return flags.get(method)


def _read_prompts(path: str) -> List[str]:
    from common.data import read_prompts

    return read_prompts(path)


def _classifier_flags(p: Preset, lay: Layout) -> List[str]:
    path = classifier_path(p, lay)
    flags = ["--model_path", path] if path else []
    # One token: --theme takes an optional value (nargs='?'), and an empty one is the default anyway.
    return flags + ([f"--theme={p.theme}"] if p.theme else [])


def finetuning_steps(p: Preset, method: str, lay: Layout, compat: str) -> List[Step]:
    """The two individual scripts and the sequential one, on the related then the unrelated curriculum."""
    steps = []
    for dataset in DATASETS:
        curriculum = datagen.curriculum_string(_count(getattr(p, dataset)), IMAGES_PER_CONCEPT)
        common = ["--pretrained_model_name_or_path", lay.model(), "--train_data_dir", lay.data(dataset),
                  *SEED_FLAGS, "--curriculum", curriculum, "--validation_prompts", shown(p.validation_prompts)]
        if compat == "reference":
            common += ["--compat", "reference"]
        tags = ["--tag", f"method={method}", "--tag", f"concept={p.name}", "--tag", f"data={dataset}"]
        # The individual runs save no pipelines: 7.7 GB per chunk, 77 GB per run at SD-1.4 size, and every score
        # is in validations.jsonl; the sequential run keeps the seed README's curriculum-4, curriculum-7 and final.
        individual = ["--clip_epoch", str(EPOCH_BUDGET), "--save_model", "False"]
        per_script = {
            "finetuning_individual_CLIP.py": ["--clip_threshold", str(p.clip_threshold), *individual],
            "finetuning_individual_Classifier.py": ["--bc_threshold", str(p.bc_threshold),
                                                    *_classifier_flags(p, lay), *individual],
            "finetuning_sequential.py": ["--num_train_epochs", str(SEQUENTIAL_EPOCHS), "--curriculum_checkpoints",
                                         CURRICULUM_CHECKPOINTS, "--clip_threshold", str(p.clip_threshold),
                                         "--bc_threshold", str(p.bc_threshold), *_classifier_flags(p, lay)],
        }
        for script in SCRIPTS:
            steps.append(Step(script, (*common, *per_script[script], "--output_dir", lay.run(script, dataset), *tags),
                              f"{os.path.splitext(script)[0]} on the {dataset} curriculum"))
    return steps


def evaluation_steps(p: Preset, method: str, base_model: str, lay: Layout) -> List[Step]:
    """eval_model.py on the base, the unlearned model and the sequential runs' checkpoints; then the report."""
    runs = [lay.run("finetuning_sequential.py", d) for d in DATASETS]
    argv = [",".join([base_model, lay.model(), *runs]), classifier_path(p, lay) or "none", p.name,
            "--prompt_file", shown(p.validation_prompts), "--curr",
            "--images_per_prompt", str(EVAL_IMAGES_PER_PROMPT), "--gpu", "0", "--output_dir", lay.eval_dir()]
    if p.theme:
        argv.append(f"--theme={p.theme}")
    report = [lay.run(s, d) for d in DATASETS for s in SCRIPTS]
    return [Step("eval_model.py", tuple(argv),
                 f"score the original and the unlearned model and the sequential checkpoints ({len(DATASETS)} "
                 f"curricula): {_prompt_count(p.validation_prompts)} prompts x {EVAL_IMAGES_PER_PROMPT} images each"),
            Step("tools/report.py", (*report, "--concept", p.name, "--out", lay.report_dir()),
                 "the revival tables and plots of this cell")]


def plan(p: Preset, method: str, base_model: str = BASE_MODEL, work_dir: str = "paper_runs",
         compat: str = "reference") -> List[Step]:
    """Every step of one cell (concept x method, both curricula), in the order they must run."""
    _require(bool(method.strip()) and slug(method, sep="-") == method.lower(),
             f"--method {method!r}: a method's name in letters, digits and '-' (e.g. esd-x, uce, salun)")
    _require(compat in ("reference", "none"), f"--compat {compat!r}: 'reference' or 'none'")
    method = method.lower()
    lay = Layout(work_dir, p.slug, method)
    return (data_steps(p, base_model, lay) + classifier_steps(p, base_model, lay)
            + unlearn_steps(p, method, base_model, lay) + finetuning_steps(p, method, lay, compat)
            + evaluation_steps(p, method, base_model, lay))


def commands(p: Preset, method: str, base_model: str = BASE_MODEL, work_dir: str = "paper_runs",
             compat: str = "reference") -> List[Tuple[str, List[str]]]:
    """The plan's commands only, as (program, argv) pairs."""
    return [(s.program, list(s.argv)) for s in plan(p, method, base_model, work_dir, compat) if s.program]


# ---- the paper's grid: every method x concept x curriculum as one tools/grid.py file ---------------------------

# The paper's nine methods as tools/unlearn.py names them ("esd": ESD-x, or ESD-u for nudity as ESD's authors erase
# it; esd_for says which).
PAPER_METHODS = ("salun", "esd", "erasediff", "ac", "mace", "spm", "sa", "receler", "uce")
# The grid's phases, in the order a phase's jobs may start (each after the previous phase's jobs finished).
PHASES = ("data", "classifier images", "classifier", "unlearning", "revival runs", "evaluation", "report")
_PHASE_OF = {"tools/generate_training_data.py": None, "tools/train_classifier.py": "classifier",
             "tools/unlearn.py": "unlearning", "eval_model.py": "evaluation", "tools/report.py": "report",
             **{s: "revival runs" for s in SCRIPTS}}
GRID_OUT_ROOT = "{out_root}"  # the plans' working directory in a grid: tools/grid.py fills in its --out_root


def esd_for(p: Preset) -> str:
    """The ESD variant of the paper's "ESD" row for a concept: ESD-u for nudity (its authors' choice), else ESD-x."""
    return "esd-u" if p.kind == "nudity" else "esd-x"


def _grid_cells(argv: Sequence[str]) -> Tuple[str, List[Tuple[str, Tuple[str, ...]]]]:
    """A step's argv as (positional words, [(flag, its values)]) in order; --tag items dropped (the grid tags)."""
    positional, flags = [], []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            flags.append((name, (value,) if eq else ()))
        elif flags:
            flags[-1] = (flags[-1][0], flags[-1][1] + (token,))
        else:
            positional.append(token)
    return shlex.join(positional), [(f, v) for f, v in flags if f != "--tag"]


def grid_rows(concepts: Sequence[str], methods: Sequence[str], base_model: str = BASE_MODEL,
              compat: str = "reference", root: str = DEFAULT_ROOT) -> Tuple[List[str], List[dict], Dict[str, range]]:
    """(columns, rows, {phase: row indices}) of the grid file of every concept x method cell, each step once.

    Every method must be one tools/unlearn.py makes (a published checkpoint has no command to put in a grid).
    """
    from tools.unlearning import METHODS

    by_phase: Dict[str, List[dict]] = {phase: [] for phase in PHASES}
    seen = set()
    for concept in concepts:
        p = load_preset(concept, root)
        for name in methods:
            method = esd_for(p) if name == "esd" else name
            _require(method in METHODS, f"--methods {name}: not made by tools/unlearn.py (its methods: "
                                        f"{', '.join(METHODS)})")
            for step in plan(p, method, base_model, GRID_OUT_ROOT, compat):
                _require(step.program != "tools/import_model.py",
                         f"--methods {name}: the presets have no tools/unlearn.py command for it (a published "
                         "checkpoint has no command to put in a grid)")
                if step.program is None or (step.program, step.argv) in seen:
                    continue  # a note, or a step every method of the concept shares (data, classifier)
                seen.add((step.program, step.argv))
                args, flags = _grid_cells(step.argv)
                if step.program == "tools/report.py":  # its --out, as the grid names every output directory
                    flags = [("--output_dir" if f == "--out" else f, v) for f, v in flags]
                phase = _PHASE_OF.get(step.program)
                dataset = next((d for d in DATASETS if any(d in os.path.basename(v) for f, vs in flags
                                                           if f in ("--output_dir", "--train_data_dir") for v in vs)),
                               "-")
                if phase is None:  # generate_training_data.py: curricula, or the classifier's images
                    out = dict(flags)["--output_dir"][0]
                    phase = "classifier images" if "classifier_data" in out else "data"
                    dataset = os.path.basename(out)
                shared = phase in ("data", "classifier images", "classifier")
                row = {"script": step.program, "method": "-" if shared else method, "concept": p.name,
                       "dataset": dataset, "args": args}
                for flag, values in flags:
                    column = flag if len(values) <= 1 else flag + "*"
                    row[column] = (values[0] if len(values) == 1 else "on" if not values
                                   else shlex.join(values))
                by_phase[phase].append(row)
    rows, ranges = [], {}
    for phase in PHASES:
        ranges[phase] = range(len(rows), len(rows) + len(by_phase[phase]))
        rows += by_phase[phase]
    columns = ["script", "method", "concept", "dataset", "args"]
    for row in rows:
        columns += [c for c in row if c not in columns]
    return columns, rows, ranges


def grid_csv(concepts: Sequence[str], methods: Sequence[str], base_model: str = BASE_MODEL,
             compat: str = "reference", root: str = DEFAULT_ROOT) -> str:
    """The grid file: a header saying how to submit it phase by phase, then the rows (tools/gridspec.py's format)."""
    import csv
    import io

    columns, rows, ranges = grid_rows(concepts, methods, base_model, compat, root)
    head = [f"The paper's grid: {len(concepts)} concepts x {len(methods)} methods ({', '.join(methods)}; esd is ESD-u "
            "for nudity, ESD-x otherwise) x the related and unrelated curricula.",
            "Written by: python tools/paper.py grid > slurm/paper_grid.csv (configs/paper/ inputs; docs/reproduce.md "
            "says which settings follow the paper).",
            "Submit from the repository's root, each phase after the previous one (afterok), e.g.:"]
    prev = None
    for phase in PHASES:
        r = ranges[phase]
        if not len(r):
            continue
        dep = f"--dependency=afterok:${prev} " if prev else ""
        var = phase.replace(" ", "_").upper()
        head.append(f"  {var}=$(sbatch --parsable {dep}--array={r.start}-{r.stop - 1}%32 slurm/grid.sbatch "
                    f"slurm/paper_grid.csv paper_runs)   # {phase}: {len(r)} jobs")
        prev = var
    head.append("Styles: fetch the timm classifier's weights once first (network): python tools/paper.py commands "
                "--concept van_gogh --method uce prints the line.")
    buf = io.StringIO()
    for line in head:
        buf.write(f"# {line}\n")
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buf.getvalue()
