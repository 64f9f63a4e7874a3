#!/usr/bin/env python
"""Individual protocol with the CLIP criterion.

For each curriculum chunk, fine-tune the unlearned UNet from scratch and count
the epochs until the mean CLIP cosine similarity of the validation images
exceeds --clip_threshold (the concept has revived).

    accelerate launch finetuning_individual_CLIP.py --pretrained_model_name_or_path=... \
        --train_data_dir=... --curriculum="50,100" --clip_threshold=0.31 --validation_prompts=prompts.txt
"""

from common import cli, entry


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    parser = cli.training_parser("finetuning_individual_CLIP.py", __doc__)
    cli.add_individual_args(parser, validation_epochs=2)
    parser.add_argument("--clip_threshold", type=float, default=0.31,
                        help="revived when mean CLIP cosine (0..1 scale) > this; the paper uses 0.31")
    parser.set_defaults(script="finetuning_individual_CLIP.py")  # recorded in config.json; which run an output directory holds
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return cli.finish(parser, args, [
        lambda a: cli.check_threshold(a.clip_threshold, "--clip_threshold", -1.0),
        cli.validate_individual,
        cli.validate_common,
    ])


def main(args):
    return entry.individual(args, entry.one_criterion(args, "clip"))


if __name__ == "__main__":
    main(parse_args())
