#!/usr/bin/env python
"""Concept-inversion probe: learn one token embedding for the erased concept against the frozen unlearned model.

    python tools/concept_inversion.py --pretrained_model_name_or_path esd-x-vangogh \\
        --train_data_dir vangogh_images --validation_prompts inversion_prompts.txt \\
        --initializer_token painting --concept_name "Van Gogh" --output_dir inversion-vangogh

Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative
Models" (ICLR 2024): textual inversion on the unlearned model. The UNet, VAE and
text encoder stay frozen; only the new token's row of the text encoder's input
embedding matrix is trained, on a few images of the concept. If prompts with the
learned token bring the concept back, the method hid the concept rather than
erased it. Validation images are generated with the learned token (each
validation prompt holds --placeholder_token) and scored by the run's criteria:
CLIP against the prompt with the placeholder replaced by --concept_name, and
the classifier when --model_path is given.

Writes learned_embeds.safetensors (diffusers' textual-inversion format:
StableDiffusionPipeline.load_textual_inversion reads it), config.json,
validations.jsonl (one record per criterion per validation), summary.json and
log.txt.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common import cli, numerics  # noqa: E402
from common.clip_score import DEFAULT_CLIP, check_clip_spec  # noqa: E402
from common.data import read_metadata, read_prompts  # noqa: E402
from common.errors import InputError  # noqa: E402
from common.models import check_pipeline_dir, resolve_model_path  # noqa: E402
from common.results import SUMMARY_FILE, VALIDATIONS_FILE  # noqa: E402

PROG = "concept_inversion.py"
SCRIPT = "tools/concept_inversion.py"  # config.json's "script": which tool an output directory's results come from
PROTOCOL = "inversion"
EMBEDS_FILE = "learned_embeds.safetensors"  # the name diffusers' textual_inversion example saves
IMAGES_DIR = "validation_images"
DEFAULT_TEMPLATES = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}", "a drawing of a {}")
# The imagefolder field every metadata.jsonl row has: the images' captions are not used, so none is required.
PATH_FIELD = "file_name"


def build_parser() -> cli.Parser:
    """The command line's flags (docs/flags.md is generated from this)."""
    p = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and concept")
    g.add_argument("--pretrained_model_name_or_path", "--model", dest="pretrained_model_name_or_path", required=True,
                   help="the unlearned model: a diffusers Stable Diffusion directory (or hub id); never modified")
    g.add_argument("--train_data_dir", required=True,
                   help="imagefolder directory of the concept's images (metadata.jsonl names them; captions unused)")
    g.add_argument("--placeholder_token", default="<concept>",
                   help="the new token whose embedding is learned; must not be a token of the tokenizer already")
    g.add_argument("--initializer_token", required=True,
                   help="a word the tokenizer keeps as one token (e.g. 'painting'); the new embedding starts as its "
                        "embedding")
    g.add_argument("--concept_name", required=True,
                   help="the concept in words, e.g. 'Van Gogh': CLIP scores each image against its prompt with the "
                        "placeholder replaced by this (generation uses the learned token)")
    g.add_argument("--templates", default=None,
                   help="text file of training prompt templates, one per line, each with {} where the placeholder "
                        "goes (default: " + ", ".join(repr(t) for t in DEFAULT_TEMPLATES) + ")")

    g = p.add_argument_group("training")
    g.add_argument("--learning_rate", type=float, default=5e-3, help="AdamW learning rate of the new embedding")
    g.add_argument("--train_batch_size", type=int, default=4, help="images per step (drawn from the concept images)")
    g.add_argument("--max_train_steps", type=int, default=500, help="optimizer steps")
    g.add_argument("--resolution", type=int, default=512,
                   help="training and validation image size in pixels (a multiple of 8; SD-1.x: 512)")
    g.add_argument("--center_crop", action="store_true", help="centre crop the training images (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="flip training images horizontally at random")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the images, templates, noise and timesteps of every step and every validation image")
    g.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    cli.add_tf32_arg(g)

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompts", required=True,
                   help="text file, one prompt per non-empty line, with the placeholder where the concept goes "
                        "(at least one must hold it; prompts without it are generated and scored as written)")
    g.add_argument("--validation_steps", type=int, default=100,
                   help="validate every N steps; also before training (step 0) and after the last step")
    cli.add_sampling_args(g, batch_help="prompts per generation batch (0: all prompts at once)")
    g.add_argument("--save_validation_images", action="store_true",
                   help="keep every validation image as OUTPUT_DIR/validation_images/step-NNNNN/KKKK.png")
    g.add_argument("--clip_model", default=DEFAULT_CLIP, help=cli.CLIP_MODEL_HELP)
    g.add_argument("--clip_threshold", type=float, default=0.31,
                   help="revived when mean CLIP cosine (0..1 scale) > this; the paper uses 0.31")

    # cli.add_classifier_args would also describe --compat, which a probe does not have.
    g = p.add_argument_group("concept classifier")
    g.add_argument("--model_path", default=None,
                   help="transformers image-classification directory, or a timm state dict with --theme <style> "
                        "(omit to run CLIP only)")
    g.add_argument("--bc_threshold", type=float, default=0.3, help="classifier criterion: accuracy >= this")
    cli.add_classifier_options(g, compat=False)

    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", required=True,
                   help="where the learned embedding and the results are written (one probe per directory)")
    g.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a label kept in config.json's tags (repeatable), e.g. method=esd-x concept=vangogh")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    # The classifier's loader reads --compat (a fine-tuning scripts' flag): a probe always has this toolkit's semantics.
    p.set_defaults(compat="none")
    return p


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def read_templates(path: Optional[str]) -> List[str]:
    """Training prompt templates: the built-in list, or one per line of ``path``, each with a {} slot."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_prompts(path, flag="--templates")
    for t in templates:
        _require("{}" in t, f"--templates {path}: {t!r} has no {{}} where the placeholder goes")
    return templates


def fill(template: str, word: str) -> str:
    """A training template with its {} slot(s) filled with ``word`` (str.format would trip on other braces)."""
    return template.replace("{}", word)


def validation_steps(max_steps: int, every: int) -> List[int]:
    """The steps after which the probe validates: 0 (the token still the initializer's), every N-th, the last."""
    return sorted({0, max_steps, *range(every, max_steps + 1, every)})


def _check_numbers(args: argparse.Namespace) -> None:
    """Cheap checks first: numbers and words, independent of any file."""
    cli.parse_tags(args.tag)
    cli.check_resolution(args.resolution)
    _require(args.learning_rate > 0 and math.isfinite(args.learning_rate),
             f"--learning_rate {args.learning_rate}: must be positive")
    _require(args.train_batch_size >= 1, f"--train_batch_size {args.train_batch_size}: must be at least 1")
    _require(args.max_train_steps >= 1, f"--max_train_steps {args.max_train_steps}: must be at least 1")
    _require(args.validation_steps >= 1, f"--validation_steps {args.validation_steps}: must be at least 1")
    _require(args.num_inference_steps >= 1, f"--num_inference_steps {args.num_inference_steps}: must be at least 1")
    _require(args.guidance_scale >= 0, f"--guidance_scale {args.guidance_scale}: must be >= 0")
    _require(args.validation_batch_size >= 0, f"--validation_batch_size {args.validation_batch_size}: must be >= 0")
    cli.check_threshold(args.clip_threshold, "--clip_threshold", -1.0)
    cli.check_threshold(args.bc_threshold, "--bc_threshold", 0.0)
    placeholder = args.placeholder_token
    _require(placeholder != "" and placeholder.split() == [placeholder],
             f"--placeholder_token {placeholder!r}: must be one word without spaces")
    _require(placeholder != args.initializer_token.strip(),
             f"--placeholder_token {placeholder!r}: must differ from --initializer_token")
    _require("{}" not in placeholder, f"--placeholder_token {placeholder!r}: must not contain {{}}")
    _require(args.concept_name.strip() != "", "--concept_name: empty")


def _check_files(args: argparse.Namespace) -> None:
    """The input files and the output directory, still before any model loads."""
    from tools.unlearn import resolve_device

    resolve_device(args.device)
    out = args.output_dir
    _require(not os.path.isfile(out), f"--output_dir {out}: is a file")
    for name in (VALIDATIONS_FILE, SUMMARY_FILE, EMBEDS_FILE):
        _require(not os.path.exists(os.path.join(out, name)),
                 f"--output_dir {out}: holds results of an earlier run ({name}); choose another --output_dir")
    check_pipeline_dir(args.pretrained_model_name_or_path)
    model_dir = resolve_model_path(args.pretrained_model_name_or_path)
    _require(not os.path.isdir(model_dir) or os.path.realpath(out) != os.path.realpath(model_dir),
             f"--output_dir {out}: is the model's directory; write the probe's results elsewhere")
    prompts = read_prompts(args.validation_prompts)
    _require(any(args.placeholder_token in p for p in prompts),
             f"--validation_prompts {args.validation_prompts}: no prompt holds the placeholder "
             f"{args.placeholder_token!r}, so no image would use the learned token")
    read_templates(args.templates)
    read_metadata(args.train_data_dir, PATH_FIELD)  # every row's image exists and opens; no rows is an error
    check_clip_spec(args.clip_model)
    cli.validate_classifier(args, required=False)


def _check_tokens(args: argparse.Namespace) -> None:
    """Against the model's tokenizer (the only part loaded here): the initializer is one token, the placeholder new."""
    tokenizer = load_tokenizer(args.pretrained_model_name_or_path)
    initializer_ids(tokenizer, args.initializer_token)
    _require(args.placeholder_token not in tokenizer.get_vocab(),
             f"--placeholder_token {args.placeholder_token!r}: already a token of the model's tokenizer; "
             "choose a new string such as <concept>")


def load_tokenizer(model: str):
    """The pipeline's CLIP tokenizer alone."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(resolve_model_path(model), subfolder="tokenizer")


def initializer_ids(tokenizer, word: str) -> int:
    """The id of the initializer token; InputError unless the tokenizer keeps it as exactly one token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    pieces = " ".join(tokenizer.convert_ids_to_tokens(ids))
    _require(len(ids) == 1, f"--initializer_token {word!r}: the tokenizer makes {len(ids)} tokens of it "
                            f"({pieces or 'none'}); choose a word that is exactly one token")
    return ids[0]


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    return cli.finish(parser, args, [_check_numbers, _check_files, _check_tokens])


# ---- the probe ------------------------------------------------------------------------------------------------


def add_placeholder(tokenizer, text_encoder, placeholder: str, initializer: str) -> int:
    """Add the placeholder token, grow the embedding matrix by one row, start that row as the initializer's."""
    import torch

    init_id = initializer_ids(tokenizer, initializer)
    _require(tokenizer.add_tokens(placeholder) == 1, f"--placeholder_token {placeholder!r}: could not be added")
    token_id = tokenizer.convert_tokens_to_ids(placeholder)
    # mean_resizing would draw the new row from the old rows' statistics (and the global RNG); it is overwritten.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[token_id] = weight[init_id]
    return token_id


class EmbeddingRow:
    """Trains one row of the text encoder's input embedding matrix; every other row stays as it was, bit for bit.

    The whole matrix is the optimizer's parameter (the new row cannot be a
    tensor of its own inside nn.Embedding), so the template words' rows get
    gradients too: after every step they are put back, as diffusers'
    textual_inversion example does. Weight decay is 0, so nothing but the
    gradient moves the new row.
    """

    def __init__(self, text_encoder, token_id: int, learning_rate: float):
        import torch

        self.token_id = token_id
        self.weight = text_encoder.get_input_embeddings().weight
        self.weight.requires_grad_(True)
        self.original = self.weight.detach().clone()
        self.optimizer = numerics.adamw([self.weight], lr=learning_rate, weight_decay=0.0)

    def step(self, loss) -> None:
        """One AdamW step on the loss, then every row but the new one restored."""
        import torch

        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            learned = self.weight[self.token_id].clone()
            self.weight.copy_(self.original)
            self.weight[self.token_id] = learned

    def vector(self):
        """The learned embedding: float32, on the CPU, shape (hidden,)."""
        return self.weight[self.token_id].detach().float().cpu().clone()


def train_step(parts, encoder, dataset, training_prompts: Sequence[str], row: EmbeddingRow, step: int, seed: int,
               batch: int) -> float:
    """One step of the textual-inversion objective; returns its loss.

    The random numbers of step ``step`` come from the toolkit's per-update
    generator, so a run repeats exactly: the draws of the fine-tuning scripts
    (crop, flip, posterior noise, noise, timesteps), then which images and
    which templates.
    """
    import torch

    from common.data import tokenize_captions
    from common.training import diffusion_loss, draw_batch, noisy_inputs, step_generator

    device = row.weight.device
    scheduler = parts.noise_scheduler
    g = step_generator(seed, 0, 0, step)
    draws = draw_batch(g, batch, encoder.latent_shape, scheduler.config.num_train_timesteps, 0.0, 0.0)
    # Every image once before any repeats, whatever the batch size and the number of images.
    order = torch.randperm(len(dataset), generator=g)
    images = order.repeat(math.ceil(batch / len(dataset)))[:batch].tolist()
    prompts = [training_prompts[i] for i in torch.randint(len(training_prompts), (batch,), generator=g).tolist()]
    # The encoder also embeds the rows' "captions" (their file names): unused, the prompts are the templates'.
    latents, _ = encoder(dataset, images, draws["flip"], draws["crop"], draws["latent_noise"])
    timesteps = draws["timesteps"].to(device)
    noisy, target = noisy_inputs(latents, scheduler, draws["noise"].to(device), draws["applied_noise"].to(device),
                                 timesteps)
    # With gradient: the loss reaches the new row only through the text encoder.
    hidden = parts.text_encoder(tokenize_captions(parts.tokenizer, prompts).to(device), return_dict=False)[0]
    pred = parts.unet(noisy, timesteps, hidden, return_dict=False)[0]
    loss = diffusion_loss(pred, target, timesteps, scheduler, None)
    row.step(loss)
    return float(loss.detach())


class Validation:
    """Generate one image per validation prompt with the learned token; score it under every criterion."""

    def __init__(self, args, pipe, criteria, prompts: Sequence[str], recorder):
        from common.validation import image_seed

        self.args, self.pipe, self.criteria, self.recorder = args, pipe, criteria, recorder
        self.prompts = list(prompts)
        # What CLIP compares each image with: the concept in words where the prompt has the learned token.
        self.scored_prompts = [p.replace(args.placeholder_token, args.concept_name) for p in prompts]
        self.seeds = [image_seed(args.seed, k) for k in range(len(prompts))]
        self.records: List[dict] = []

    def __call__(self, step: int, loss: Optional[float]) -> List[dict]:
        from common.results import score_stats
        from common.validation import generate_images

        a = self.args
        images = generate_images(self.pipe, self.prompts, self.seeds,
                                 batch_size=a.validation_batch_size or len(self.prompts),
                                 num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale,
                                 resolution=a.resolution)
        if a.save_validation_images:
            folder = os.path.join(a.output_dir, IMAGES_DIR, f"step-{step:05d}")
            os.makedirs(folder, exist_ok=True)
            for k, im in enumerate(images):
                im.save(os.path.join(folder, f"{k:04d}.png"))
        out = []
        for c in self.criteria:
            scores = [float(s) for s in c.score_images(images, self.scored_prompts)]
            stats = score_stats(scores)
            record = {"step": step, "criterion": c.name, "scores": scores, "mean": stats["mean"], "min": stats["min"],
                      "max": stats["max"], "threshold": c.threshold, "revived": c.met(stats["mean"]), "loss": loss,
                      "images_seen": step * a.train_batch_size}
            self.recorder.validation(record)
            self.recorder.log(f"step {step}: {c.name} mean {stats['mean']:.4f} (threshold {c.threshold:g})"
                              + (" REVIVED" if record["revived"] else "")
                              + ("" if loss is None else f", training loss {loss:.4f}"))
            out.append(record)
        self.records.extend(out)
        return out


def summarise(args, criteria, records: List[dict]) -> dict:
    """summary.json: per criterion its best mean, the first step it was met (None: never) and its final mean."""
    best, crossed, final = {}, {}, {}
    for c in criteria:
        mine = [r for r in records if r["criterion"] == c.name]
        top = max(mine, key=lambda r: r["mean"])  # the first of equal means: max keeps the earliest
        best[c.name] = {"mean": top["mean"], "step": top["step"]}
        crossed[c.name] = next((r["step"] for r in mine if r["revived"]), None)
        final[c.name] = mine[-1]["mean"]
    return {"protocol": PROTOCOL, "criteria": {c.name: c.threshold for c in criteria}, "best": best,
            "crossed": crossed, "final": final, "placeholder_token": args.placeholder_token,
            "initializer_token": args.initializer_token, "concept_name": args.concept_name,
            "steps": args.max_train_steps}


def save_embedding(path: str, token: str, vector) -> None:
    """diffusers' textual-inversion file {token: (hidden,) float32}, written under a temporary name and renamed."""
    from safetensors.torch import save_file

    from common.results import writing

    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    with writing("learned embedding", path):
        save_file({token: vector.contiguous()}, tmp)
        os.replace(tmp, path)


@dataclass
class Inversion:
    """What a probe leaves in memory: the summary, the model parts with the trained token, that token's id."""

    summary: dict
    parts: object  # common.models.SDParts; its tokenizer and text encoder hold the learned token
    token_id: int


def main(args: argparse.Namespace) -> Inversion:
    """Learn the placeholder's embedding on the frozen unlearned model, validating as it trains."""
    start = time.time()
    import torch
    from tqdm.auto import tqdm

    from common import criteria as registry
    from common.data import ImageTransform, load_training_data
    from common.encoding import make_encoder
    from common.models import load_sd_parts
    from common.precision import set_tf32
    from common.results import RunRecorder
    from common.validation import build_pipeline
    from tools.unlearn import resolve_device

    device = torch.device(resolve_device(args.device))
    set_tf32(args.allow_tf32)
    torch.manual_seed(args.seed)
    prompts, templates = read_prompts(args.validation_prompts), read_templates(args.templates)
    recorder = RunRecorder(args.output_dir, is_main=True, logger_name="concept_inversion")
    recorder.write_config({"script": SCRIPT, "protocol": PROTOCOL, "args": vars(args),
                           "tags": cli.parse_tags(args.tag), "numeric_environment": numerics.describe()})
    try:
        # 1. The unlearned model, plus one new token whose embedding starts as the initializer's.
        recorder.log(f"loading {args.pretrained_model_name_or_path} on {device}")
        parts = load_sd_parts(args.pretrained_model_name_or_path)
        token_id = add_placeholder(parts.tokenizer, parts.text_encoder, args.placeholder_token,
                                   args.initializer_token)
        # 2. Everything frozen but the embedding matrix, of which only the new row is kept changed.
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.requires_grad_(False).eval().to(device)
        row = EmbeddingRow(parts.text_encoder, token_id, args.learning_rate)

        # The concept's images: VAE posteriors computed once when the crop is fixed (--center_crop).
        dataset = load_training_data(args.train_data_dir, None, PATH_FIELD)
        transform = ImageTransform(args.resolution, args.center_crop, args.random_flip)
        encoder = make_encoder(parts, transform, device, torch.float32, cache=True)
        encoder.prepare(dataset, (0, len(dataset)))
        training_prompts = [fill(t, args.placeholder_token) for t in templates]

        criteria = registry.build_all(args, device)
        validate = Validation(args, build_pipeline(parts, parts.unet), criteria, prompts, recorder)
        when = set(validation_steps(args.max_train_steps, args.validation_steps))
        recorder.log(f"{len(dataset)} concept images, {len(templates)} templates, {len(prompts)} validation prompts; "
                     f"criteria: {', '.join(f'{c.name} ({c.threshold:g})' for c in criteria)}")

        # 3-4. Train the row; validate before training, every --validation_steps and after the last step.
        validate(0, None)
        losses: List[float] = []
        bar = tqdm(total=args.max_train_steps, desc="inversion", disable=args.quiet)
        try:
            for step in range(1, args.max_train_steps + 1):
                loss = train_step(parts, encoder, dataset, training_prompts, row, step, args.seed,
                                  args.train_batch_size)
                if not math.isfinite(loss):
                    from common.training import NonFiniteLoss

                    raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step}; lower --learning_rate")
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step in when:
                    # The mean loss of the steps since the previous validation: one step's loss is mostly noise.
                    validate(step, sum(losses) / len(losses))
                    losses = []
        finally:
            bar.close()

        # 5. The learned embedding, loadable into the unlearned pipeline; the summary.
        save_embedding(os.path.join(args.output_dir, EMBEDS_FILE), args.placeholder_token, row.vector())
        summary = summarise(args, criteria, validate.records)
        summary["wall_seconds"] = round(time.time() - start, 3)
        recorder.summary(summary)
        for c in criteria:
            crossed, best = summary["crossed"][c.name], summary["best"][c.name]
            recorder.log(f"{c.name}: " + (f"revived at step {crossed}" if crossed is not None else
                                          f"not revived in {args.max_train_steps} steps")
                         + f"; best mean {best['mean']:.4f} (step {best['step']}), "
                           f"final {summary['final'][c.name]:.4f}, threshold {c.threshold:g}")
        recorder.log(f"wrote {os.path.join(args.output_dir, EMBEDS_FILE)} ({args.placeholder_token})")
    finally:
        recorder.close()
    return Inversion(summary, parts, token_id)


def _cli() -> None:
    """Parse, run; a diverged probe exits 3 and a failed write 4, each with one line (as the training scripts)."""
    from common.entry import DIVERGED_EXIT_CODE, WRITE_FAILED_EXIT_CODE
    from common.results import WriteFailed
    from common.training import NonFiniteLoss

    args = parse_args()
    try:
        main(args)
    except (NonFiniteLoss, WriteFailed) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(DIVERGED_EXIT_CODE if isinstance(err, NonFiniteLoss) else WRITE_FAILED_EXIT_CODE) from None


if __name__ == "__main__":
    _cli()
