#!/usr/bin/env python
"""Individual protocol with the classifier criterion.

Same protocol as finetuning_individual_CLIP.py; a chunk has revived when the
share of validation images the concept classifier puts in the concept class
reaches --bc_threshold.

    accelerate launch finetuning_individual_Classifier.py --pretrained_model_name_or_path=... \
        --train_data_dir=... --curriculum="50,100" --bc_threshold=0.3 --model_path=classifier/ \
        --validation_prompts=prompts.txt
"""

from common import cli, entry


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    parser = cli.training_parser("finetuning_individual_Classifier.py", __doc__, clip=False)
    cli.add_individual_args(parser, validation_epochs=1)
    cli.add_classifier_args(parser, required=True)
    parser.add_argument("--bc_threshold", type=float, default=0.3,
                        help="revived when classifier accuracy >= this (0..1); the paper uses 0.3")
    parser.set_defaults(script="finetuning_individual_Classifier.py")  # recorded in config.json; which run an output directory holds
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return cli.finish(parser, args, [
        lambda a: cli.check_threshold(a.bc_threshold, "--bc_threshold", 0.0),
        cli.validate_individual,
        cli.validate_common,
        lambda a: cli.validate_classifier(a, required=True),
    ])


def main(args):
    return entry.individual(args, entry.one_criterion(args, "classifier"))


if __name__ == "__main__":
    main(parse_args())
