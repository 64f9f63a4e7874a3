#!/usr/bin/env python
"""Score an unlearned model of the toy world against the world's erasure targets (the card's figures).

    python -m tools.toy_world.score MODEL_DIR [--world toy_world]

Prints the figures the world's card records for its own unlearned models (classifier accuracy on the target,
CLIP top-1 of the retained concept and of the target's neighbours) with the targets of world.BOUNDS, as JSON
with --json. Run under the demo's pin (the default) for figures that repeat bit for bit on any AVX2 machine.
"""

from __future__ import annotations

import argparse
import json

from tools.toy_world.world import BOUNDS, DEFAULT_DIR, SCALES, load_card, paths


def score(model_dir: str, world: str = DEFAULT_DIR, seed: int = 0) -> dict:
    """evaluate_model's figures of ``model_dir`` (the card's protocol: same settings, same seeds)."""
    from common.classifier import ConceptClassifier
    from common.clip_score import ClipScorer
    from tools.toy_world.build import _seed, evaluate_model

    card = load_card(world)
    if card is None:
        raise SystemExit(f"score: no toy world in {world} (make demo builds it)")
    p = paths(world)
    settings = SCALES[card["config"]["scale"]]
    figures = evaluate_model(model_dir, ConceptClassifier(p["classifier"]), ClipScorer(p["clip"]), settings,
                             _seed(card["config"]["seed"], 70))
    checks = {"classifier_acc_target": "unlearned_classifier_acc_target",
              "clip_top1_retained": "unlearned_retained_top1"}
    figures["targets"] = {k: {"value": figures[k], "target": " ".join(map(str, BOUNDS[b])),
                              "met": _met(figures[k], *BOUNDS[b])} for k, b in checks.items()}
    return figures


def _met(value: float, op: str, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--world", default=DEFAULT_DIR)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no_pin", action="store_true", help="torch's own kernels and threads (other bits)")
    args = p.parse_args(argv)
    if not args.no_pin:
        from common import numerics

        numerics.pin_process()
    figures = score(args.model_dir, args.world)
    if args.json:
        print(json.dumps(figures, indent=1))
        return
    for k, v in figures["targets"].items():
        print(f"{k:24s} {v['value']:.3f}  target {v['target']}  {'met' if v['met'] else 'NOT met'}")
    print(f"{'neighbours_mean_clip_top1':24s} {figures['neighbours_mean_clip_top1']:.3f}")
    print(f"{'clip_score_target':24s} {figures['clip_score_target']:.4f}")


if __name__ == "__main__":
    main()
