#!/usr/bin/env python
"""Individual protocol with the classifier criterion.

Same protocol as finetuning_individual_CLIP.py; a chunk has revived when the
share of validation images the concept classifier puts in the concept class
reaches --bc_threshold. With --theme naming an I2P category (violence,
"illegal activity", ...) the judge is Q16 (--q16_prompts, --q16_threshold).

    accelerate launch finetuning_individual_Classifier.py --pretrained_model_name_or_path=... \
        --train_data_dir=... --curriculum="50,100" --bc_threshold=0.3 --model_path=classifier/ \
        --validation_prompts=prompts.txt
"""

from common import cli, entry
from common.q16 import i2p_theme


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    parser = cli.training_parser("finetuning_individual_Classifier.py", __doc__, clip=False)
    cli.add_individual_args(parser, validation_epochs=1)
    cli.add_classifier_args(parser, required=True)
    parser.add_argument("--bc_threshold", type=float, default=0.3,
                        help="revived when classifier accuracy >= this (0..1); the paper uses 0.3")
    cli.add_q16_args(parser.add_argument_group("Q16 (the judge with an I2P --theme)"), 0.3,
                     "with an I2P --theme: revived when the share of images Q16 judges inappropriate >= this")
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
        _check_judge,
    ])


def _check_judge(args) -> None:
    from common.errors import InputError

    if args.q16_prompts is not None and i2p_theme(args.theme) is None:
        raise InputError("--q16_prompts: this script's judge is the classifier unless --theme names an I2P "
                         "category (then Q16)")
    if args.q16_or_nudenet and i2p_theme(args.theme) is None:
        raise InputError("--q16_or_nudenet: I2P's judge needs --theme naming an I2P category (and --q16_prompts)")


def criterion_name(args) -> str:
    """The script's one criterion: Q16 for an I2P --theme (I2P's Q16 or NudeNet with --q16_or_nudenet), else the
    classifier."""
    if i2p_theme(args.theme):
        return "i2p" if args.q16_or_nudenet else "q16"
    return "classifier"


def main(args):
    return entry.individual(args, entry.one_criterion(args, criterion_name(args)))


if __name__ == "__main__":
    main(parse_args())
