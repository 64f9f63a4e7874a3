#!/usr/bin/env python
"""Evaluate checkpoints on an erased concept: CLIP score and classifier accuracy.

    python eval_model.py RUN_DIR,OTHER_MODEL CLASSIFIER_DIR "golf ball" --prompt_file prompts.txt --curr

For each checkpoint (and with --curr each curriculum-* folder of a run), N
images per prompt are generated from seeds (seed, prompt, image), saved as PNG
in a folder of their own (with a metadata.jsonl of file names, prompts and
seeds), and scored; results go to OUTPUT_DIR/results.jsonl and results.csv and
are printed as a table.

With --images, MODEL_PATHS are folders of images already on disk (such a
folder, or any other): they are scored the same way and no model is loaded.

    python eval_model.py eval_results/images/000-model CLASSIFIER_DIR "golf ball" --images

With --utility CAPTIONS, each checkpoint (and its base model) also draws one
image per caption, scored with FID and KID against --utility_reference, CLIP
score and SSIM/PSNR against the base model's images (docs/utility.md); with
several processes (accelerate launch) the captions are shared among them.

    python eval_model.py RUN_DIR none "golf ball" --utility coco30k.csv --utility_reference coco_val2014/
"""

import argparse
import os

import torch

from common import cli, utility
from common.clip_score import DEFAULT_CLIP, ClipScorer, check_clip_spec
from common.data import read_prompts
from common.errors import InputError, exit_on_input_error
from common.validation import SCHEDULERS
from common.evaluation import (checkpoint_label, evaluate_checkpoint, find_checkpoints, format_table,
                               generation_dtype, image_folder_prompts, score_image_folder, write_results)

PROG = "eval_model.py"


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    parser = cli.Parser(description=__doc__.split("\n\n")[0], prog=PROG)
    parser.add_argument("model_paths", help="comma-separated diffusers pipeline directories (run directories with "
                                            "--curr; image folders with --images)")
    parser.add_argument("eval_model_path", help="concept classifier (directory, or state dict with --theme); '' or 'none' for CLIP only")
    parser.add_argument("concept", help="the erased concept, e.g. 'golf ball' (recorded with the results)")
    parser.add_argument("--prompt_file", default=None,
                        help="one prompt per non-empty line (required unless --images folders carry metadata.jsonl)")
    parser.add_argument("--images", action="store_true",
                        help="MODEL_PATHS are folders of existing images: score them, load no pipeline. Each image's "
                             "prompt: the folder's metadata.jsonl (file_name, prompt), else --prompt_file line k for "
                             "p{k}_{j}.png, else a one-line --prompt_file")
    parser.add_argument("--curr", action="store_true", help="also evaluate each path's curriculum-* subfolders")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index (CPU when CUDA is absent)")
    parser.add_argument("--images_per_prompt", type=int, default=5, help="images generated per prompt (the paper: 5)")
    parser.add_argument("--output_dir", default="eval_results", help="results.jsonl, results.csv and images/")
    parser.add_argument("--seed", type=int, default=0, help="image j of prompt k is drawn with seed (seed, k, j)")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP,
                        help=cli.CLIP_MODEL_HELP)
    parser.add_argument("--batch_size", type=int, default=10, help="images per generation batch")
    parser.add_argument("--num_inference_steps", type=int, default=50,
                        help="sampling steps per image (default 50: the pipeline default the published "
                             "evaluation used; the training scripts validate with 20)")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's own")
    parser.add_argument("--weights", default="trained", choices=("trained", "ema"),
                        help="which UNet of a run's pipeline to evaluate when it saved two (--use_ema): 'trained' "
                             "(default; the weights the run validated and its Revival Points describe) or 'ema'. "
                             "The table's weights column says which was used ('single': the folder has one UNet)")
    parser.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                        help="generation precision: text encoder and VAE in it, the UNet in fp32 under autocast, "
                             "as the fine-tuning scripts validate (default: fp16 on CUDA, fp32 on the CPU; fp16 "
                             "without CUDA falls back to fp32 with a warning)")
    parser.add_argument("--scheduler", default=None, choices=tuple(SCHEDULERS),
                        help="sampler of the generated images on the model's own noise schedule (default: the "
                             "model's own scheduler, PNDM for SD-1.x; lms: Diffusion-MU-Attack's; dpm-solver++: "
                             "P4D's); results.jsonl records the one used")
    utility.add_options(parser.add_argument_group("utility (docs/utility.md)"))
    cli.add_classifier_options(parser.add_argument_group("concept classifier"), compat=False)
    cli.add_q16_args(parser.add_argument_group("Q16 (a q16_inappropriate column)"))
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    with exit_on_input_error(PROG):
        for flag, value, low in (("--images_per_prompt", args.images_per_prompt, 1), ("--batch_size", args.batch_size, 1),
                                 ("--num_inference_steps", args.num_inference_steps, 1), ("--gpu", args.gpu, 0)):
            if value < low:
                raise InputError(f"{flag} {value}: must be >= {low}")
        cli.check_resolution(args.resolution)
        paths = [p for p in args.model_paths.split(",") if p.strip()]
        if args.images:
            prompts = read_prompts(args.prompt_file, "--prompt_file") if args.prompt_file else None
            for folder in paths:
                image_folder_prompts(folder, prompts)  # every image has a prompt, before any model loads
            checkpoints = paths
        else:
            if not args.prompt_file and not args.utility:
                raise InputError("--prompt_file is required (unless --images or --utility)")
            prompts = read_prompts(args.prompt_file, "--prompt_file") if args.prompt_file else None
            checkpoints = find_checkpoints(paths, args.curr)
        check_clip_spec(args.clip_model)
        classifier = None if args.eval_model_path.strip().lower() in ("", "none") else args.eval_model_path
        from common.classifier import check_classifier

        cli.check_q16(args, classifier, "EVAL_MODEL_PATH")
        if classifier or args.theme.lower() == "nudity":
            check_classifier(classifier, args.theme, flag="EVAL_MODEL_PATH", processor=args.classifier_processor)
            cli.check_nudity_args(args)
        if os.path.isfile(args.output_dir):
            raise InputError(f"--output_dir {args.output_dir}: is a file")
        captions = utility.check_args(args)
    # What main() works from: the parsed flags (untouched) and what validating them resolved.
    return argparse.Namespace(**{**vars(args), "prompts": prompts, "checkpoints": checkpoints,
                                 "classifier": classifier, "captions": captions})


def main(args):
    # Phase 1: device and scorers, loaded once for every checkpoint.
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{args.gpu}" if cuda else "cpu")
    dtype = generation_dtype(args.mixed_precision, cuda)
    clip = ClipScorer(args.clip_model, device)
    classifier = None
    if args.classifier or args.theme.lower() == "nudity":
        from common.classifier import ConceptClassifier

        classifier = ConceptClassifier(args.classifier, args.theme, device, args.concept_index,
                                       args.classifier_processor, args.timm_arch, args.nudity_scorer,
                                       args.nudity_classes, args.nudity_threshold, args.nudity_judge)
    q16 = None  # Q16, or with --q16_or_nudenet I2P's judge (Q16 or NudeNet)
    if args.q16_prompts:
        from common.criteria import i2p_judge, uses_i2p
        from common.q16 import Q16

        with exit_on_input_error(PROG):  # its width against --clip_model's: one line, exit 2
            q16 = i2p_judge(args, clip) if uses_i2p(args) else Q16(args.q16_prompts, clip)
    if args.captions is not None:
        summaries = _utility(args, clip, device, dtype)  # first: the other processes stop after it
        if summaries is None:
            return []
    os.makedirs(args.output_dir, exist_ok=True)
    # Phase 2: every checkpoint, its images in a folder of its own (or, with --images, every image folder).
    rows = []
    for n, path in enumerate(args.checkpoints if args.prompts is not None or args.images else []):
        if args.images:
            rows.append(score_image_folder(path, args.prompts, args.concept, clip, classifier, q16))
            write_results(args.output_dir, rows)
            continue
        image_dir = os.path.join(args.output_dir, "images", f"{n:03d}-" + checkpoint_label(path).replace("/", "__"))
        rows.append(evaluate_checkpoint(
            path, args.prompts, args.concept, clip, classifier, args.images_per_prompt, args.seed, args.batch_size,
            args.num_inference_steps, args.guidance_scale, args.resolution, image_dir, device, dtype, args.weights,
            args.scheduler, q16))
        write_results(args.output_dir, rows)  # partial results survive an interruption
    # Phase 3: the tables.
    if rows:
        print(format_table(rows))
    if args.captions is not None:
        print(utility.format_utility_table(summaries))
    return rows


def _utility(args, clip, device, dtype):
    """--utility: reference features (checked before anything is written), each model's caption images shared
    among the processes, scored on the main process; its summaries there, None on the others."""
    from common.precision import process_state

    state = process_state()
    if state.num_processes > 1:
        device = state.device
    resolution = args.resolution or utility.native_resolution(args.checkpoints[0])
    extractor = reference = reference_path = None  # the other processes only draw: no extractor to load
    with exit_on_input_error(PROG):
        loaded = utility.on_main_process(state, lambda: utility.load_reference(
            args.utility_reference, args.fid_features, args.inception_weights, clip, resolution, args.output_dir,
            device))
    if state.is_main_process:
        extractor, reference, reference_path = loaded
    summaries = utility.run_utility(
        args.checkpoints, args.captions, args.output_dir, clip, extractor, reference, reference_path,
        args.utility_base, args.seed, args.batch_size, args.num_inference_steps, args.guidance_scale, resolution,
        device, dtype, args.weights, args.kid_subsets, args.kid_subset_size, state, lpips=args.lpips,
        scheduler=args.scheduler)
    return summaries if state.is_main_process else None


if __name__ == "__main__":
    from common.results import WriteFailed

    args = parse_args()
    try:
        main(args)
    except WriteFailed as err:  # a full disk: one line, exit 4 (results written so far stay complete)
        import sys

        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(4) from None
