#!/usr/bin/env python
"""Generate fine-tuning data: N images per concept, in curriculum order, from any diffusers text-to-image model.

    accelerate launch tools/generate_training_data.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --concepts concepts.json --output_dir data/golf_related --images_per_concept 50

Writes an imagefolder (images and metadata.jsonl with a ``prompt`` column, rows
concept by concept) for ``--train_data_dir``, and prints the ``--curriculum``
string to pass with it. Rerunning the same command fills only missing images;
under ``accelerate launch`` with several processes the images are split
between them. Image j of concept i uses seed image_seed(seed, i, j), recorded
per row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tools import datagen  # noqa: E402
from common.cli import Parser, check_resolution  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402
from common.models import check_diffusers_dir  # noqa: E402

PROG = "generate_training_data.py"


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = Parser(description=__doc__.split("\n\n")[0], prog=PROG)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers text-to-image directory (or hub id)")
    p.add_argument("--concepts", required=True,
                   help="concepts in curriculum order: .json ({'templates': [...], 'concepts': [name | {name, prompts}]}) "
                        "or text ('name' or 'name: prompt | prompt' per line)")
    p.add_argument("--template", action="append", default=None,
                   help="prompt template with {concept} for concepts without their own prompts (repeatable; "
                        f"default {datagen.DEFAULT_TEMPLATES[0]!r})")
    p.add_argument("--output_dir", required=True, help="the imagefolder written (images and metadata.jsonl)")
    p.add_argument("--images_per_concept", type=int, default=50, help="the paper: 50")
    p.add_argument("--batch_size", type=int, default=8, help="images per generation batch (per process)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="sampling steps per image")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    p.add_argument("--seed", type=int, default=0, help="image j of concept i is drawn with seed (seed, i, j)")
    p.add_argument("--mixed_precision", default="fp16", choices=("no", "fp16", "bf16"),
                   help="weights dtype on GPU (CPU always runs fp32)")
    p.add_argument("--caption_column", default="prompt", help="metadata column holding the prompt")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier dataset with other settings first")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with exit_on_input_error(PROG):
        for flag, value in (("--images_per_concept", args.images_per_concept), ("--batch_size", args.batch_size),
                            ("--num_inference_steps", args.num_inference_steps)):
            if value < 1:
                raise InputError(f"{flag} {value}: must be >= 1")
        check_resolution(args.resolution)
        if os.path.isfile(args.output_dir):
            raise InputError(f"--output_dir {args.output_dir}: is a file")
        check_diffusers_dir(args.pretrained_model_name_or_path)  # any pipeline, not only SD's parts
        concept_list = datagen.read_concepts(args.concepts, args.template)
        settings = {
            "model": os.path.abspath(args.pretrained_model_name_or_path)
            if os.path.isdir(args.pretrained_model_name_or_path) else args.pretrained_model_name_or_path,
            "concepts": [{"name": c.name, "prompts": list(c.prompts)} for c in concept_list],
            "images_per_concept": args.images_per_concept, "seed": args.seed,
            "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "resolution": args.resolution, "caption_column": args.caption_column,
        }
        if not args.overwrite:
            datagen.check_settings(args.output_dir, settings)
    # What main() works from: the parsed flags (untouched) and the concepts and settings they resolved to.
    return argparse.Namespace(**{**vars(args), "concept_list": concept_list, "settings": settings})


def main(args):
    import torch

    from common.models import effective_mixed_precision, weight_dtype_for
    from common.precision import process_state
    from common.validation import generate_images, shard

    state = process_state()
    t0 = time.time()
    # Phase 1: what is missing (the same answer on every process: a pure function of the files).
    if args.overwrite and state.is_main_process:
        try:
            datagen.check_settings(args.output_dir, args.settings)
        except InputError:  # other settings: the old images would not match, start afresh
            shutil.rmtree(args.output_dir)
    state.wait_for_everyone()
    jobs = datagen.plan_images(args.concept_list, args.images_per_concept, args.seed)
    missing = datagen.missing_jobs(args.output_dir, jobs)
    if state.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        datagen.write_settings(args.output_dir, args.settings)
        print(f"{PROG}: {len(jobs)} images ({len(args.concept_list)} concept(s) x {args.images_per_concept}); "
              f"{len(jobs) - len(missing)} present, {len(missing)} to generate on {state.num_processes} process(es)",
              flush=True)
    # Phase 2: this process's share, saved batch by batch (an interruption loses at most one batch).
    mine = shard(missing, state.num_processes, state.process_index)
    if mine:
        dtype = weight_dtype_for(effective_mixed_precision(args.mixed_precision, warn=state.is_main_process))
        pipe = datagen.load_text_to_image(args.pretrained_model_name_or_path, state.device, dtype)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"generating (process {state.process_index})",
                   disable=not state.is_local_main_process)
        for b in range(0, len(mine), args.batch_size):
            batch = mine[b : b + args.batch_size]
            images = generate_images(pipe, [j.prompt for j in batch], [j.seed for j in batch], args.batch_size,
                                     args.num_inference_steps, args.guidance_scale, args.resolution)
            for job, image in zip(batch, images):
                datagen.save_image(image, os.path.join(args.output_dir, job.file_name))
            bar.update(len(batch))
        bar.close()
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    # Phase 3: the metadata, written once every image exists.
    if state.is_main_process:
        still = datagen.missing_jobs(args.output_dir, jobs)
        if still:
            raise SystemExit(f"{PROG}: error: {len(still)} images are still missing (first: {still[0].file_name})")
        datagen.write_metadata(args.output_dir, jobs, args.caption_column)
        curriculum = datagen.curriculum_string(len(args.concept_list), args.images_per_concept)
        print(f"{PROG}: wrote {args.output_dir} in {time.time() - t0:.0f} s; pass it as\n"
              f"  --train_data_dir {args.output_dir} --caption_column {args.caption_column} --curriculum {curriculum}",
              flush=True)
    return jobs


if __name__ == "__main__":
    main(parse_args())
