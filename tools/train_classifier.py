#!/usr/bin/env python
"""Train a binary concept classifier for --model_path (the weights the paper did not release).

    python tools/train_classifier.py --train_dir data/golf_ball_clf --concept "golf ball" --output_dir clf/golf_ball
    python tools/train_classifier.py --positive_dir pos/ --negative_dir neg/ --concept "Van Gogh" \\
        --timm_arch vit_large_patch16_224.augreg_in21k --init_weights in21k.safetensors --output_dir clf/van_gogh

Class 1 is the concept. The default backbone is the paper's ViT-L/16 in21k
(any local transformers directory works); the output directory is a
transformers classifier for --model_path / EVAL_MODEL_PATH. With --timm_arch
the style variant is trained instead and OUTPUT_DIR/classifier.safetensors is
the state dict for --model_path with --theme. Held-out accuracy, precision and
recall are printed and saved to OUTPUT_DIR/metrics.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tools import classifier_training as ct  # noqa: E402
from common.cli import Parser  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402
from common.models import local_dir, resolve_model_path  # noqa: E402

RANDOM = "random"  # --init_weights: no pretrained weights, on purpose
PROG = "train_classifier.py"
DEFAULT_BACKBONE = "google/vit-large-patch16-224-in21k"


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = Parser(description=__doc__.split("\n\n")[0], prog=PROG)
    data = p.add_argument_group("data (either --train_dir, or --positive_dir and --negative_dir)")
    data.add_argument("--train_dir", default=None, help="imagefolder with two class folders (positive/, negative/)")
    data.add_argument("--positive_class", default=None, help="the concept's folder in --train_dir (default 'positive')")
    data.add_argument("--positive_dir", default=None, help="images of the concept")
    data.add_argument("--negative_dir", default=None, help="images without it")
    data.add_argument("--validation_split", type=float, default=0.2, help="held-out share of each class")
    p.add_argument("--concept", required=True, help="the concept's name (the label of class 1)")
    p.add_argument("--output_dir", required=True, help="the classifier (transformers directory, or "
                   "classifier.safetensors with --timm_arch) and metrics.json")
    model = p.add_argument_group("backbone")
    model.add_argument("--model_name_or_path", default=DEFAULT_BACKBONE,
                       help="transformers image-classification backbone (hub id or local directory)")
    model.add_argument("--image_processor", default=None, help="default: the backbone's own")
    model.add_argument("--timm_arch", default=None, help="train the timm style classifier of this architecture instead")
    model.add_argument("--init_weights", default=None,
                       help="timm (required with --timm_arch): starting state dict (.safetensors/.pt), the head "
                            f"replaced; '{RANDOM}' starts from random weights")
    train = p.add_argument_group("training")
    train.add_argument("--num_epochs", type=int, default=5, help="passes over the training images")
    train.add_argument("--batch_size", type=int, default=16, help="images per step")
    train.add_argument("--learning_rate", type=float, default=2e-5, help="AdamW peak learning rate")
    train.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    train.add_argument("--warmup_fraction", type=float, default=0.1,
                       help="share of the steps with linear warm-up, then cosine decay")
    train.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
                       help="autocast precision on CUDA")
    train.add_argument("--seed", type=int, default=0, help="seeds the split, augmentation and the new head")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with exit_on_input_error(PROG):
        if args.train_dir and (args.positive_dir or args.negative_dir):
            raise InputError("give either --train_dir or --positive_dir/--negative_dir, not both")
        positive_dir, negative_dir = args.positive_dir, args.negative_dir
        if args.train_dir:
            positive_dir, negative_dir = ct.class_folders(args.train_dir, args.positive_class)
        elif not (positive_dir and negative_dir):
            raise InputError("no data: give --train_dir, or both --positive_dir and --negative_dir")
        positives = ct.list_images(positive_dir, "--positive_dir")
        negatives = ct.list_images(negative_dir, "--negative_dir")
        if not 0 <= args.validation_split < 1:
            raise InputError(f"--validation_split {args.validation_split}: must be in [0, 1)")
        for flag, value in (("--num_epochs", args.num_epochs), ("--batch_size", args.batch_size)):
            if value < 1:
                raise InputError(f"{flag} {value}: must be >= 1")
        if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
            raise InputError(f"--learning_rate {args.learning_rate}: must be a positive number")
        if args.timm_arch:
            import timm

            if not timm.is_model(args.timm_arch):
                raise InputError(f"--timm_arch {args.timm_arch}: not a timm architecture")
            if not args.init_weights:  # a ViT-L from random weights on a few hundred images learns little
                raise InputError("--timm_arch needs --init_weights FILE, the pretrained weights (the in21k ones: "
                                 "tools/prefetch.py --what timm-vit-l16-in21k), or --init_weights random to start "
                                 "from random weights on purpose")
            if args.init_weights != RANDOM and not os.path.isfile(args.init_weights):
                raise InputError(f"--init_weights {args.init_weights}: no such file")
        else:
            if args.init_weights:
                raise InputError("--init_weights is for --timm_arch; a transformers backbone loads its own weights")
            local = local_dir(args.model_name_or_path, "--model_name_or_path")
            if local is not None and not os.path.isfile(os.path.join(local, "config.json")):
                raise InputError(f"--model_name_or_path {args.model_name_or_path}: no config.json "
                                 "(not a transformers model directory)")
        if os.path.isfile(args.output_dir):
            raise InputError(f"--output_dir {args.output_dir}: is a file")
        split = ct.stratified_split(positives, negatives, args.validation_split, args.seed)
    # What main() works from: the parsed flags (untouched) and the images and split they resolved to.
    return argparse.Namespace(**{**vars(args), "positive_dir": positive_dir, "negative_dir": negative_dir,
                                 "positives": positives, "negatives": negatives, "split": split})


def main(args):
    from common.results import atomic_write_json

    import torch

    t0 = time.time()
    # Phase 1: backbone with a fresh two-class head, initialised from --seed (so is a --timm_arch model without
    # --init_weights): the same command trains the same classifier.
    torch.manual_seed(args.seed)
    if args.timm_arch:
        backbone = ct.TimmBackbone(args.timm_arch, None if args.init_weights == RANDOM else args.init_weights)
    else:
        backbone = ct.TransformersBackbone(resolve_model_path(args.model_name_or_path), args.image_processor, args.concept)
    print(f"{PROG}: {len(args.positives)} positive and {len(args.negatives)} negative images; "
          f"{len(args.split.train)} train, {len(args.split.heldout)} held out", flush=True)
    # Phase 2: fine-tune, with held-out metrics after each epoch.
    model, history, accelerator = ct.train_classifier(
        backbone, args.split, args.num_epochs, args.batch_size, args.learning_rate, args.weight_decay,
        args.warmup_fraction, args.seed, args.mixed_precision)
    # Phase 3: save in the form the fine-tuning scripts read, with the metrics.
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        saved = backbone.save(model, args.output_dir)
        final = history[-1]
        record = {"concept": args.concept, "concept_index": ct.CONCEPT_INDEX, "kind": backbone.kind,
                  "backbone": args.timm_arch or args.model_name_or_path, "init_weights": args.init_weights,
                  "positives": len(args.positives), "negatives": len(args.negatives),
                  "train_images": len(args.split.train), "heldout_images": len(args.split.heldout),
                  "heldout": {k: final.get(k) for k in ("accuracy", "precision", "recall", "f1", "tp", "fp", "fn", "tn")},
                  "history": history, "settings": {k: getattr(args, k) for k in (
                      "num_epochs", "batch_size", "learning_rate", "weight_decay", "warmup_fraction",
                      "validation_split", "seed", "mixed_precision")},
                  "wall_s": round(time.time() - t0, 1)}
        atomic_write_json(os.path.join(args.output_dir, "metrics.json"), record)
        use = f"--model_path {saved}" + (f" --theme <style> --timm_arch {args.timm_arch}" if args.timm_arch else "")
        if args.split.heldout:
            print(f"{PROG}: held-out accuracy {final['accuracy']:.3f}, precision {final['precision']:.3f}, "
                  f"recall {final['recall']:.3f} ({len(args.split.heldout)} images)")
        print(f"{PROG}: saved {saved}; use it as {use}")
    return history


if __name__ == "__main__":
    main(parse_args())
