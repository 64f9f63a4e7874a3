"""Fine-tuning data generation: N images per concept, in curriculum order (tools/generate_training_data.py).

The paper fine-tunes on 50 generated images per concept, one concept per
curriculum chunk, general concepts first and close ones last (docs/protocols.md: inputs). A
concepts file lists the chunks in order; image j of concept i is generated
from prompt ``prompts[j % len(prompts)]`` with seed ``image_seed(seed, i, j)``,
so every image is a pure function of the settings: a rerun generates only the
missing files and any number of processes produce the same dataset.

Output layout (an imagefolder that ``--train_data_dir`` reads)::

    OUT/metadata.jsonl         one row per image, concept by concept (the curriculum order)
    OUT/images/000-<slug>/0000.png
    OUT/generation.json        the settings; a rerun with other settings is refused
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from common.errors import InputError
from common.results import atomic_write_json, atomic_write_text, slug

DEFAULT_TEMPLATES = ("a photo of a {concept}",)
SETTINGS_FILE = "generation.json"


@dataclass(frozen=True)
class Concept:
    name: str
    prompts: tuple  # already formatted


@dataclass(frozen=True)
class ImageJob:
    chunk: int
    index: int
    concept: str
    prompt: str
    seed: int
    file_name: str  # relative to the output directory


def _format(template: str, name: str, where: str) -> str:
    try:
        return template.format(concept=name)
    except (KeyError, IndexError, ValueError) as err:
        raise InputError(f"{where}: template {template!r} cannot be filled ({err}); use {{concept}} only") from None


def read_concepts(path: str, templates: Optional[Sequence[str]] = None) -> List[Concept]:
    """Concepts in curriculum order from a .json or text file (docs/workflow.md gives both formats).

    JSON: a list, or ``{"templates": [...], "concepts": [...]}``; each concept is
    a name (filled into the templates) or ``{"name": ..., "prompts": [...]}``
    (prompts may use ``{concept}``). Text: one concept per non-empty line,
    ``name`` or ``name: prompt one | prompt two``; ``#`` starts a comment.
    """
    if not os.path.isfile(path):
        raise InputError(f"--concepts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    default = list(templates or DEFAULT_TEMPLATES)
    entries = []  # (name, prompts or None, where)
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"--concepts {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if isinstance(data, dict):
            default = list(data.get("templates") or default)
            data = data.get("concepts")
        if not isinstance(data, list):
            raise InputError(f"--concepts {path}: expected a list of concepts (or an object with 'concepts')")
        for n, item in enumerate(data):
            where = f"--concepts {path} entry {n}"
            if isinstance(item, str):
                entries.append((item, None, where))
            elif isinstance(item, dict) and isinstance(item.get("name"), str):
                prompts = item.get("prompts") or item.get("templates")
                if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)):
                    raise InputError(f"{where}: 'prompts' must be a list of strings")
                entries.append((item["name"], prompts, where))
            else:
                raise InputError(f"{where}: a concept is a name or an object with a 'name'")
    else:
        for line_no, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, rest = line.partition(":")
            prompts = [p.strip() for p in rest.split("|") if p.strip()] or None
            entries.append((name.strip(), prompts, f"--concepts {path} line {line_no}"))
    concepts = []
    for name, prompts, where in entries:
        if not name.strip():
            raise InputError(f"{where}: empty concept name")
        filled = tuple(_format(t, name.strip(), where) for t in (prompts or default))
        concepts.append(Concept(name.strip(), filled))
    if not concepts:
        raise InputError(f"--concepts {path}: no concepts")
    return concepts


def plan_images(concepts: Sequence[Concept], per_concept: int, seed: int) -> List[ImageJob]:
    """Every image of the dataset, in curriculum order (concept by concept)."""
    from common.validation import image_seed  # imported here: planning programs (paper.py, audit.py) need no torch

    jobs = []
    for i, c in enumerate(concepts):
        folder = f"images/{i:03d}-{slug(c.name, sep='-')}"
        for j in range(per_concept):
            jobs.append(ImageJob(i, j, c.name, c.prompts[j % len(c.prompts)], image_seed(seed, i, j),
                                 f"{folder}/{j:04d}.png"))
    return jobs


def curriculum_string(num_concepts: int, per_concept: int) -> str:
    """The --curriculum value for this dataset: cumulative image counts per chunk."""
    return ",".join(str(per_concept * (i + 1)) for i in range(num_concepts))


def image_ok(path: str) -> bool:
    """True when the file exists and PIL can read it (a truncated write counts as missing)."""
    from PIL import Image

    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # PIL raises many types for corrupt files
        return False


def missing_jobs(output_dir: str, jobs: Sequence[ImageJob]) -> List[ImageJob]:
    return [j for j in jobs if not image_ok(os.path.join(output_dir, j.file_name))]


def check_settings(output_dir: str, settings: dict) -> None:
    """Refuse to add to a directory generated with other settings (the images would not match)."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        raise InputError(f"--output_dir {output_dir}: generated earlier with other settings ({', '.join(changed)}); "
                         "use a new directory or --overwrite")


def write_settings(output_dir: str, settings: dict) -> None:
    atomic_write_json(os.path.join(output_dir, SETTINGS_FILE), settings)


def save_image(image, path: str) -> None:
    """Write a PNG under a temporary name and rename it: a killed run never leaves half an image."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_metadata(output_dir: str, jobs: Sequence[ImageJob], caption_column: str = "prompt") -> str:
    """metadata.jsonl in curriculum order: file_name, caption, concept, chunk and the image's seed."""
    lines = [json.dumps({"file_name": j.file_name, caption_column: j.prompt, "concept": j.concept,
                         "chunk": j.chunk, "seed": j.seed}) + "\n" for j in jobs]
    path = os.path.join(output_dir, "metadata.jsonl")
    atomic_write_text(path, "".join(lines))
    return path


def load_text_to_image(path: str, device, dtype):
    """Any diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, ...), safety checker off, progress bars off."""
    from diffusers import AutoPipelineForText2Image

    from common.models import resolve_model_path

    kwargs = {}
    local = resolve_model_path(path)
    index = os.path.join(local, "model_index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            if "safety_checker" in json.load(f):  # SD 1.x: the reference generated without it
                kwargs = {"safety_checker": None, "requires_safety_checker": False}
    pipe = AutoPipelineForText2Image.from_pretrained(local, torch_dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
