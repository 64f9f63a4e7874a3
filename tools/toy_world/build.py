"""A deterministic "toy world" in which the paper's pipeline runs for real on 2 CPU cores.

Everything is trained here, from a seed, in minutes (docs/protocols.md: models and precision): drawn concept
images (colour x shape at 32 px) with captions, a toy CLIP trained
contrastively on them, a toy Stable Diffusion (its text encoder is the toy
CLIP's text tower, a small VAE and a ~1M-parameter UNet trained with the DDPM
loss), a binary ViT classifier for the target concept, unlearned copies of the
base model made with ``tools/unlearn.py`` (ESD-x and UCE), curriculum datasets
in imagefolder format and validation prompts. Quality figures go to
``card.json`` with the target each one should meet and whether it did.

The target concept is the colour+shape "a red circle" (``TARGET``): class 1 of
the classifier is a red circle, and its negatives include the related
concepts (red squares, red rings, blue/orange circles, ...), so it detects the
conjunction, not the colour or the shape alone. The retained concept is
"a blue square" (``RETAINED``); it is judged with the toy CLIP: the share of
images whose top-1 caption among all 48 "a {colour} {shape}" captions is
"a blue square".

Budget on 2 CPU cores: training the full world took 401 s (2026-11-29, and
a ``--retrain`` on 2026-12-02), up to 644 s while other jobs shared the
cores (a card records the per-part timings); assembled from the
committed trained weights (weights.py) it takes about a minute (52-58 s,
2026-12-02); ``scale="reduced"`` builds the same world with tiny
step counts in about a minute, for tests. The CLI sets OMP_WAIT_POLICY=PASSIVE
because spinning OpenMP threads slowed steps on a shared machine (seen while
the builder was developed, 2026-11-28; not re-measured since).

Bit-for-bit the same world on every x86-64 AVX2 machine: the CLI and the
demo build it under common/numerics.py's pin (kernel level, MKL branch, one
thread), recorded in the card's ``numeric_environment``. Built unpinned (tests,
``--no_pin``) it uses torch's default kernels and threads, and its bits depend
on the machine.

The world is cached in a directory (default ``toy_world/`` at the repo root)
and rebuilt only when ``card.json`` is missing or records another
configuration (``VERSION``, seed, scale, settings) or another pin state. It is built in a temporary
sibling directory and renamed into place, ``card.json`` written last, so a
directory with a card is complete.
"""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common import numerics
from tools import tiny
from .classifier import train_classifier
from .clip import clip_processor, make_clip, retrieval_top1, train_clip
from . import weights
from .sd import encode_latents, encode_texts, make_unet, make_vae, save_sd, train_unet, train_vae
from .world import (
    BOUNDS, CARD_FILE, CONCEPTS, CURRICULUM, DEFAULT_DIR, NEIGHBOURS, PER_CONCEPT, RELATED, RESOLUTION, RETAINED,
    ROOT, TARGET, TEMPLATES, UNET_PROCESSES, UNLEARN_METHODS, UNRELATED, VALIDATION_REPEATS, _seed, caption,
    concept_prompts, draw_concepts, load_card, paths, pixels, world_config)


def write_curriculum_dataset(out_dir: str, concepts: Sequence[Tuple[str, str]], per_concept: int, seed: int) -> str:
    """An imagefolder of ``per_concept`` images per concept, concept by concept (row order = curriculum order).

    Image j of a concept is captioned with phrasing j % len(TEMPLATES).
    """
    rng = np.random.default_rng(seed)
    rows = [(tiny.draw_shape(s, c, RESOLUTION, rng), caption(c, s, template=j))
            for c, s in concepts for j in range(per_concept)]
    return tiny.write_caption_folder(out_dir, rows, caption_column="prompt")


def write_prompts(path: str, prompts: Sequence[str]) -> str:
    """One prompt per line."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(prompts) + "\n")
    return path


def unlearn_argv(method: str, base: str, out: str, settings: dict, seed: int) -> List[str]:
    """tools/unlearn.py's flags that erase the target from ``base`` into ``out``."""
    argv = ["--method", method, "--model", base, "--output_dir", out, "--seed", str(seed), "--device", "cpu",
            "--quiet"]
    if method == "esd-x":
        argv += ["--concept", caption(*TARGET), "--iterations", str(settings["esd_iterations"]),
                 "--learning_rate", str(settings["esd_learning_rate"]), "--ddim_steps", str(settings["esd_ddim_steps"]),
                 "--probe_samples", "2"]
    elif method == "esd-u":
        # ESD-u in the toy world (docs/demo.md, the methods side by side): ESD-x's settings leave the target at 0.433
        # (not met); twice the iterations meet both targets (0.167, 0.967) and keep the neighbours best of the tries.
        argv += ["--concept", caption(*TARGET), "--iterations", str(2 * settings["esd_iterations"]),
                 "--learning_rate", str(settings["esd_learning_rate"]), "--ddim_steps", str(settings["esd_ddim_steps"]),
                 "--probe_samples", "2"]
    elif method == "uce":
        # Erase every phrasing of the target; keep the other 47 concepts' outputs (guide: the empty prompt).
        argv += ["--erase", *concept_prompts(TARGET), "--preserve", *[caption(*c) for c in CONCEPTS if c != TARGET]]
    elif method == "ac":
        # docs/unlearning.md, AC in the toy world: "circle" cannot anchor here (a third of its images are red
        # circles); "green circle" never is one. 100 anchor images from its phrasings, 100 steps at 3e-4, prior on.
        anchor = ("green", "circle")
        argv += ["--concept", " ".join(TARGET), "--anchor", " ".join(anchor), "--anchor_prompts",
                 *concept_prompts(anchor), "--anchor_images", "100", "--iterations", "100", "--learning_rate", "3e-4",
                 "--regularization", "on"]
    elif method == "mace":
        # docs/unlearning.md, MACE in the toy world: 16 drawn red circles with their exact masks (tools/toy_world/
        # masks.py writes them into OUT's sibling mace_data/ first: mace_data_dir), the ten phrasings as templates,
        # the 47 other concepts preserved, learning rate 2e-3.
        data = mace_data_dir(out)
        templates = [t.replace("{colour} {shape}", "{}") for t in TEMPLATES]
        argv += ["--concept", " ".join(TARGET), "--prompt_templates", *templates, "--concept_data",
                 os.path.join(data, "images"), "--masks", os.path.join(data, "masks"), "--preserve",
                 *[f"a {c} {s}" for c in TOY_RETAIN_COLOURS["salun"] for s in TOY_SHAPES if (c, s) != TARGET],
                 "--learning_rate", "2e-3"]
    elif method == "receler":  # docs/unlearning.md, Receler in the toy world
        argv += ["--concept", caption(*TARGET), "--iterations", "100", "--ddim_steps", "20", "--adv_iterations", "5",
                 "--learning_rate", "2e-4", "--erase_on", "both"]
    elif method == "spm":  # docs/unlearning.md, SPM in the toy world
        argv += ["--concept", caption(*TARGET), "--iterations", "300", "--learning_rate", "1e-2", "--lr_scheduler",
                 "constant", "--ddim_steps", "20", "--la_strength", "0"]
    elif method in TOY_RETAIN_COLOURS:
        argv += ["--concept", caption(*TARGET)] + _data_method_argv(method)
    else:
        raise ValueError(f"unknown method {method!r}")
    return argv


# The methods unlearn_argv makes in the toy world (docs/unlearning.md's settings), in the order the demo shows them.
TOY_METHODS = ("esd-x", "esd-u", "uce", "ac", "salun", "erasediff", "sa", "mace", "spm", "receler")

# The settings of docs/unlearning.md's "In the toy world" runs of the data-based methods, as written there (the order
# of the retained concepts' colours is each run's own: it sets the generated images' order, and SalUn's pseudo prompt
# is the first of them).
TOY_RETAIN_COLOURS = {
    "salun": ("red", "orange", "yellow", "green", "blue", "purple", "white", "black"),
    "erasediff": ("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
    "sa": ("red", "orange", "yellow", "green", "blue", "purple", "white", "black"),
}
TOY_SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def mace_data_dir(out: str) -> str:
    """Where MACE's drawn images and exact masks go for a model written to ``out`` (tools/toy_world/masks.py)."""
    return os.path.join(os.path.dirname(os.path.abspath(out)), "mace_data")


def _data_method_argv(method: str) -> List[str]:
    """The flags of a method that trains on generated forget/retain (or surrogate/replay) images, in the toy world."""
    others = [f"a {c} {s}" for c in TOY_RETAIN_COLOURS[method] for s in TOY_SHAPES if (c, s) != TARGET]
    forget = concept_prompts(TARGET)
    if method == "salun":  # 40 forget and 94 retain images, 5 epochs (25 steps) at 2e-4
        return ["--forget_prompts", *forget, "--forget_images", "40", "--retain_prompts", *others,
                "--retain_images", "94", "--generation_steps", "20", "--epochs", "5", "--learning_rate", "2e-4"]
    if method == "erasediff":  # 40 forget and 94 retain images, 100 outer steps, the other settings its defaults
        return ["--forget_prompts", *forget, "--forget_images", "40", "--retain_prompts", *others,
                "--retain_images", "94", "--generation_steps", "20", "--iterations", "100"]
    # sa: the surrogate "a green square", replay of the 47 others (the Fisher on all 94 images), 300 steps at 1e-3,
    # the trained weights written (--ema_decay 0: the published 0.9999 keeps 97% of the base after 300 steps).
    return ["--forget_prompts", *forget[1:], "--surrogate", "a green square", "--surrogate_images", "48",
            "--replay_prompts", *others, "--replay_images", "94", "--fisher_samples", "94", "--fisher_timesteps", "20",
            "--generation_steps", "20", "--iterations", "300", "--batch_size", "8", "--learning_rate", "1e-3",
            "--ema_decay", "0"]


def _replace_in_file(path: str, old: str, new: str) -> None:
    """Replace a string in a text file (atomically)."""
    from common.results import atomic_write_text

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if old in text:
        atomic_write_text(path, text.replace(old, new))


def run_unlearning(method: str, base: str, out: str, settings: dict, seed: int, log: Callable = print,
                   final_root: Optional[str] = None) -> dict:
    """tools/unlearn.py, called as a function: the unlearned pipeline in ``out``; returns its card.

    The random states are restored afterwards, so the rest of the build draws what it drew when the tool ran in a
    process of its own. The tool records absolute paths; with ``final_root`` the temporary build directory in
    them is replaced by where the world will live.
    """
    import random

    from tools import unlearn

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            unlearn.main(unlearn.parse_args(unlearn_argv(method, base, out, settings, seed)))
    except SystemExit as err:  # a refused flag: a bug in this builder, not bad user input
        raise RuntimeError(f"tools/unlearn.py --method {method} refused its flags (exit {err.code})") from None
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    if final_root is not None:
        build_root = os.path.dirname(os.path.dirname(os.path.abspath(out)))  # out is <root>/unlearned/<method>
        for name in ("unlearning_card.json", "README.md"):
            if os.path.isfile(os.path.join(out, name)):
                _replace_in_file(os.path.join(out, name), build_root, final_root)
    with open(os.path.join(out, "unlearning_card.json"), encoding="utf-8") as f:
        return json.load(f)


def evaluate_model(model_dir: str, classifier, scorer, settings: dict, seed: int) -> Dict[str, object]:
    """Generate for the target, retained and neighbour prompts; classifier accuracy, CLIP retrieval, CLIP scores.

    Target and retained: ``eval_images_per_prompt`` images for each of the 10
    phrasings; neighbours: one per phrasing. Image j of prompt k uses
    ``image_seed(seed, k, j)`` as the protocol's validation does.
    """
    from common.models import load_sd_parts
    from common.validation import build_pipeline, generate_images, image_seed

    parts = load_sd_parts(model_dir)
    pipe = build_pipeline(parts, parts.unet.eval())

    def images_for(concept, k):
        prompts = concept_prompts(concept)
        rows = [(p, image_seed(seed, i, j)) for i, p in enumerate(prompts) for j in range(k)]
        images = generate_images(pipe, [p for p, _ in rows], [s for _, s in rows], batch_size=len(rows),
                                 num_inference_steps=settings["eval_inference_steps"],
                                 guidance_scale=settings["guidance_scale"], resolution=RESOLUTION)
        top1, _ = retrieval_top1(scorer, images, [CONCEPTS.index(concept)] * len(images))
        return {"classifier_rate": float(np.mean(classifier.predict(images))), "clip_top1": top1,
                "clip_score": float(np.mean(scorer.score(images, [p for p, _ in rows]))), "images": len(images)}

    out: Dict[str, object] = {}
    for name, concept in (("target", TARGET), ("retained", RETAINED)):
        r = images_for(concept, settings["eval_images_per_prompt"])
        out[f"classifier_acc_{name}"] = r["classifier_rate"]
        out[f"clip_top1_{name}"] = r["clip_top1"]
        out[f"clip_score_{name}"] = r["clip_score"]
        out[f"images_{name}"] = r["images"]
    out["neighbours"] = {caption(*c): images_for(c, 1) for c in NEIGHBOURS}
    out["neighbours_mean_clip_top1"] = float(np.mean([v["clip_top1"] for v in out["neighbours"].values()]))
    out["neighbours_mean_classifier_rate"] = float(np.mean([v["classifier_rate"] for v in out["neighbours"].values()]))
    return out


def _figure(value, key: str) -> dict:
    op, bound = BOUNDS[key]
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "target": f"{op} {bound}", "met": met}


def build_toy_world(out_dir: str = DEFAULT_DIR, seed: int = 0, scale: str = "full", log: Callable = print,
                    force: bool = False, weights_dir: Optional[str] = weights.WEIGHTS_DIR) -> dict:
    """Build the toy world into ``out_dir`` (or reuse it when its card records the same config); return the card.

    The trained parts come from ``weights_dir`` when it holds weights trained with this configuration
    (tools/toy_world/weights.py); ``weights_dir=None`` trains them.
    """
    config = world_config(seed, scale)
    card = load_card(out_dir)
    # A world built under another pin state has other bits: the pinned demo must not reuse an unpinned world.
    if (card is not None and card.get("config") == config and not force
            and numerics.same_pin(card.get("numeric_environment"))):
        log(f"toy world: {out_dir} is up to date (seed {seed}, scale {scale}); reusing it")
        log(format_card(card))
        return card
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        card = _build(tmp, config, log, final_root=os.path.abspath(out_dir), weights_dir=weights_dir)
        if os.path.exists(out_dir):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-", dir=parent)
            os.replace(out_dir, os.path.join(trash, "world"))
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(format_card(card))
    return card


def _train_vae_part(x: torch.Tensor, s: dict, seed: int) -> tuple:
    """In the second process: the VAE's weights, figures and seconds."""
    t = time.time()
    vae = make_vae(_seed(seed, 20))
    figures = train_vae(vae, x, s["vae_steps"], s["vae_batch"], s["vae_lr"], s["vae_kl_weight"], _seed(seed, 21))
    return vae.state_dict(), figures, round(time.time() - t, 2)


def _train_unet_part(rank: int, world_size: int, init_method: str, lat_mean, lat_std, scaling: float, labels,
                     text_table, s: dict, seed: int, cross_attention_dim: int, log: Callable = print) -> tuple:
    """One of ``world_size`` processes training the UNet on its share of each batch; (unet, figures), the same on
    every rank."""
    import torch.distributed as dist

    unet = make_unet(cross_attention_dim, _seed(seed, 30))  # the same seed: every process starts from the same weights
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        figures = train_unet(unet, lat_mean, lat_std, scaling, labels, text_table, s["unet_steps"], s["unet_batch"],
                             s["unet_lr"], s["caption_dropout"], _seed(seed, 31), s["snr_gamma"], log, rank=rank,
                             world_size=world_size)
    finally:
        dist.destroy_process_group()
    return unet, figures


def _train_classifier_part(s: dict, seed: int, classifier_dir: str) -> tuple:
    """In the second process: the classifier for the target concept, saved; its figures and seconds."""
    t = time.time()
    figures = train_classifier(classifier_dir, TARGET, s["classifier_steps"], s["classifier_batch"],
                               s["classifier_heldout"], _seed(seed, 40), s["classifier_lr"])
    return figures, round(time.time() - t, 2)


def _text_encoder(clip):
    """The toy SD's text encoder: the toy CLIP's text tower, frozen."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())  # transformers 5
    return text_encoder.eval().requires_grad_(False)


def _assemble_from_weights(weights_dir: str, tokenizer, p: dict) -> None:
    """Write the toy CLIP, the base pipeline and the classifier of a world from the committed trained weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(weights.folder("clip", weights_dir))
    clip.save_pretrained(p["clip"])
    clip_processor(tokenizer).save_pretrained(p["clip"])
    vae = AutoencoderKL.from_pretrained(weights.folder("vae", weights_dir)).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(weights.folder("unet", weights_dir)).eval().requires_grad_(False)
    save_sd(p["sd_base"], tokenizer, _text_encoder(clip), vae, unet)
    shutil.copytree(weights.folder("classifier", weights_dir), p["classifier"])


def _relative_paths(p, root: str):
    if isinstance(p, dict):
        return {k: _relative_paths(v, root) for k, v in p.items()}
    return os.path.relpath(p, root)


def _build(root: str, config: dict, log: Callable, final_root: Optional[str] = None,
           weights_dir: Optional[str] = None) -> dict:
    """Build every part into ``root`` (renamed to ``final_root`` afterwards); write card.json last and return it."""
    from common.clip_score import ClipScorer
    from common.classifier import ConceptClassifier
    from common.results import atomic_write_json, library_versions

    start = time.time()  # threads: the pin's (common/numerics.py), else torch's default
    seed, s = config["seed"], config["settings"]
    p = paths(root)
    timings: Dict[str, float] = {}
    figures: Dict[str, object] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.time() - t0, 2)
        return time.time()

    t = time.time()
    tokenizer = tiny.write_clip_tokenizer(os.path.join(root, ".tokenizer"))
    manifest = weights.load(config, weights_dir)
    if manifest is None:  # 1.-3. train the four parts
        clip_images, clip_labels = draw_concepts(CONCEPTS, s["clip_images_per_concept"], _seed(seed, 1))
        heldout_images, heldout_labels = draw_concepts(CONCEPTS, s["heldout_per_concept"], _seed(seed, 2))
        sd_images, sd_labels = draw_concepts(CONCEPTS, s["sd_images_per_concept"], _seed(seed, 3))
        t = lap("draw", t)

        # 1. Toy CLIP here; meanwhile, in a second process, the VAE (it needs only the drawn images), then the
        # classifier (3.; it needs nothing built here), which trains on while the UNet does: the pin runs one
        # thread per process, so two processes use both cores. Every part draws from its own seeded generator, so
        # the bits do not depend on which process trains it.
        x = pixels(sd_images)
        pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
        try:
            vae_job = pool.submit(_train_vae_part, x, s, seed)
            classifier_job = pool.submit(_train_classifier_part, s, seed, p["classifier"])
            clip = make_clip(_seed(seed, 10))
            processor = clip_processor(tokenizer)
            losses = train_clip(clip, processor, clip_images, clip_labels, s["clip_steps"], s["clip_lr"],
                                _seed(seed, 11), log)
            clip.save_pretrained(p["clip"])
            processor.save_pretrained(p["clip"])
            scorer = ClipScorer(p["clip"])
            top1, _ = retrieval_top1(scorer, heldout_images, heldout_labels)
            figures["clip"] = {"top1_retrieval_heldout": top1, "chance": 1 / len(CONCEPTS),
                               "heldout_images": len(heldout_images), "loss_first": losses[0],
                               "loss_last": float(np.mean(losses[-10:]))}
            log(f"toy CLIP: top-1 caption retrieval on {len(heldout_images)} held-out images {top1:.3f} "
                f"(chance {1 / len(CONCEPTS):.3f})")
            t = lap("clip", t)
            vae_state, figures["vae"], timings["vae"] = vae_job.result()
            t = lap("wait_for_vae", t)

            # 2. Toy SD: text encoder = the CLIP text tower; the VAE from the second process; UNet on cached latents.
            text_encoder = _text_encoder(clip)
            vae = make_vae(_seed(seed, 20))
            vae.load_state_dict(vae_state)
            vae.eval().requires_grad_(False)
            lat_mean, lat_std = encode_latents(vae, x)
            # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
            scaling = float(1.0 / lat_mean.std().clamp(min=1e-6))
            vae.register_to_config(scaling_factor=scaling)
            figures["vae"]["scaling_factor"] = scaling
            texts = [caption(*c, template=j) for c in CONCEPTS for j in range(len(TEMPLATES))] + [""]
            text_table = encode_texts(tokenizer, text_encoder, texts)
            # The UNet, the longest part, on both cores: this process and a second one (rank 1) each train on half
            # of every batch, their gradients summed each step (sd.train_unet), so both hold the same weights.
            unet_args = (lat_mean, lat_std, scaling, sd_labels, text_table, s, seed,
                         text_encoder.config.hidden_size)
            init = f"file://{os.path.join(root, '.unet_rendezvous')}"
            rank1 = pool.submit(_train_unet_part, 1, UNET_PROCESSES, init, *unet_args)
            unet, figures["unet"] = _train_unet_part(0, UNET_PROCESSES, init, *unet_args, log=log)
            rank1.result()  # rank 1's copy (bit-identical) is not needed
            with contextlib.suppress(FileNotFoundError):  # gloo's file store may have removed it already
                os.remove(os.path.join(root, ".unet_rendezvous"))
            figures["unet"]["parameters"] = sum(q.numel() for q in unet.parameters())
            unet.requires_grad_(False)
            save_sd(p["sd_base"], tokenizer, text_encoder, vae, unet)
            t = lap("unet", t)

            figures["classifier"], timings["classifier"] = classifier_job.result()
            t = lap("wait_for_classifier", t)
        finally:
            pool.shutdown(cancel_futures=True)

    else:  # the committed weights of this very configuration (tools/toy_world/weights.py)
        _assemble_from_weights(weights_dir, tokenizer, p)
        figures.update(copy.deepcopy(manifest["figures"]))
        scorer = ClipScorer(p["clip"])
        top1 = figures["clip"]["top1_retrieval_heldout"]
        t = lap("load_weights", t)

    # 4. Fine-tuning data and prompts.
    write_curriculum_dataset(p["data_related"], RELATED, PER_CONCEPT, _seed(seed, 50))
    write_curriculum_dataset(p["data_unrelated"], UNRELATED, PER_CONCEPT, _seed(seed, 51))
    # Each phrasing VALIDATION_REPEATS times: one image per line (its own seed), so a validation scores
    # 30 images and the classifier accuracy moves in steps of 1/30, not 1/10.
    write_prompts(p["prompts_target"], concept_prompts(TARGET) * VALIDATION_REPEATS)
    write_prompts(p["prompts_retained"], concept_prompts(RETAINED) * VALIDATION_REPEATS)
    t = lap("data", t)

    # 5. Unlearned models.
    unlearned = {}
    for method in UNLEARN_METHODS:
        uc = run_unlearning(method, p["sd_base"], p["unlearned"][method], s, _seed(seed, 60), log, final_root)
        unlearned[method] = None if uc is None else {"results": uc.get("results"), "command": uc.get("command"),
                                                     "wall_seconds": uc.get("wall_seconds")}
        t = lap(f"unlearn_{method}", t)

    # 6. Quality figures of the models.
    classifier = ConceptClassifier(p["classifier"])
    models = {"base": p["sd_base"], **{m: p["unlearned"][m] for m in UNLEARN_METHODS if unlearned[m] is not None}}
    evals = {}
    for name, path in models.items():
        evals[name] = evaluate_model(path, classifier, scorer, s, _seed(seed, 70))
        log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in evals[name].items() if isinstance(v, float)))
    figures["models"] = evals
    t = lap("evaluate", t)

    targets = {"clip_top1_retrieval": _figure(top1, "clip_top1_retrieval"),
               "base_classifier_acc_target": _figure(evals["base"]["classifier_acc_target"],
                                                     "base_classifier_acc_target"),
               "base_retained_top1": _figure(evals["base"]["clip_top1_retained"], "base_retained_top1")}
    for m in UNLEARN_METHODS:
        e = evals.get(m, {})
        targets[f"{m}_classifier_acc_target"] = _figure(e.get("classifier_acc_target"),
                                                        "unlearned_classifier_acc_target")
        targets[f"{m}_retained_top1"] = _figure(e.get("clip_top1_retained"), "unlearned_retained_top1")
    timings["total"] = round(time.time() - start, 2)
    card = {
        "config": config,
        "target_concept": caption(*TARGET),
        "retained_concept": caption(*RETAINED),
        "classifier_classes": {"0": "other", "1": caption(*TARGET)},
        "retained_criterion": "toy CLIP top-1 caption retrieval among the 48 'a {colour} {shape}' captions "
                              "= 'a blue square'",
        "clip_score_scale": "cosine (0..1)",
        "curriculum": CURRICULUM,
        "datasets": {"related": [caption(*c) for c in RELATED], "unrelated": [caption(*c) for c in UNRELATED]},
        "targets": targets,
        "all_targets_met": all(v["met"] for v in targets.values()),
        "figures": figures,
        "unlearned": unlearned,
        "weights": ({"source": "trained"} if manifest is None else
                    {"source": "committed", "folder": os.path.relpath(weights_dir, ROOT),
                     "trained_on": manifest["numeric_environment"]["cpu_model"],
                     "training_seconds": manifest["timings_seconds"], "digests": manifest["digests"]}),
        "timings_seconds": timings,
        "library_versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
        "numeric_environment": numerics.describe(),
        "paths": _relative_paths(paths(root), root),
    }
    shutil.rmtree(os.path.join(root, ".tokenizer"), ignore_errors=True)
    atomic_write_json(os.path.join(root, CARD_FILE), card)  # last: marks the world complete
    return card


def _weights_source(card: dict) -> str:
    w = card.get("weights", {})
    return f"trained weights from {w['folder']}" if w.get("source") == "committed" else "weights trained here"


def format_card(card: dict) -> str:
    """The card's targets as a short table."""
    lines = [f"toy world (seed {card['config']['seed']}, scale {card['config']['scale']}, "
             f"built in {card['timings_seconds']['total']:.0f} s, {_weights_source(card)}): target concept "
             f"{card['target_concept']!r}"]
    for name, f in card["targets"].items():
        value = "n/a" if f["value"] is None else f"{f['value']:.3f}"
        met = {True: "met", False: "NOT met", None: "not measured"}[f["met"]]
        lines.append(f"  {name:<36} {value:>7}  target {f['target']:<7} {met}")
    for name, e in card["figures"]["models"].items():
        lines.append(f"  {name:<8} mean CLIP score (cosine 0..1): target prompts {e['clip_score_target']:.3f}, "
                     f"retained prompts {e['clip_score_retained']:.3f}; neighbours' CLIP top-1 "
                     f"{e['neighbours_mean_clip_top1']:.3f} (not a target)")
    return "\n".join(lines)
