#!/usr/bin/env python
"""Build (or reuse) the toy world: a fully trained miniature in which the paper pipeline runs on a CPU.

    python tools/build_toy_world.py                    # toy_world/ at the repo root, assembled from the committed weights (~1 min)
    python tools/build_toy_world.py --scale reduced    # same world, tiny step counts (about a minute)
    python tools/build_toy_world.py --force            # rebuild even when the cached world is current
    python tools/build_toy_world.py --no_pin           # torch's own kernels and threads: machine-dependent bits
    python tools/build_toy_world.py --retrain          # train every part again and compare with the committed weights

The trained CLIP, VAE, UNet and classifier of the default world are
committed (tools/toy_world/weights/, with the configuration they were trained
with): a world of that configuration is assembled from them in about a minute.
``--retrain`` (``make world``) trains them from their seeds instead (about 6
minutes on 2 cores) and checks that they equal the committed ones bit for
bit, which under the pin holds on every x86-64 AVX2 machine;
``--write_weights`` stores a retrained world's parts as the committed ones
(after an intended change of the world).

What it contains and how each part is judged: tools/toy_world/. The
quality figures are printed and kept in toy_world/card.json.

The world is built under the pinned numeric environment (common/numerics.py:
AVX2 kernels, MKL's SSE2 branch, one thread), so every x86-64 AVX2 machine
builds the same bits; the process re-runs itself under it when started without.
"""

from __future__ import annotations

import os

# Threads that find their core busy sleep instead of spinning: on a shared 2-core machine spinning OpenMP
# threads made training steps up to 4x slower. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from tools.toy_world import DEFAULT_DIR, SCALES

    p = argparse.ArgumentParser(prog="build_toy_world.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=DEFAULT_DIR, help="where the world is cached (default: toy_world/ at the repo root)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (every part derives its own from it)")
    p.add_argument("--scale", default="full", choices=tuple(SCALES), help="full (the real thing) or reduced (tests)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cached world's card matches")
    p.add_argument("--retrain", action="store_true",
                   help="train the CLIP, VAE, UNet and classifier instead of using the committed weights, then "
                        "compare them with the committed ones (exit 1 when they differ)")
    p.add_argument("--write_weights", action="store_true",
                   help="with --retrain: store the retrained parts as the committed weights (tools/toy_world/weights/)")
    p.add_argument("--no_pin", action="store_true",
                   help="do not pin the numeric environment (faster on a big machine; its bits then differ from "
                        "the pinned world's and from machine to machine)")
    args = p.parse_args(argv)
    if args.write_weights and not args.retrain:
        p.error("--write_weights stores retrained weights: add --retrain")
    return args


def main(args: argparse.Namespace) -> dict:
    """Build or reuse the world (with --retrain: train it and compare with the committed weights); return its card."""
    from tools.toy_world import build_toy_world, weights, world_config

    if not args.retrain:
        return build_toy_world(args.out_dir, seed=args.seed, scale=args.scale, force=args.force)
    card = build_toy_world(args.out_dir, seed=args.seed, scale=args.scale, force=True, weights_dir=None)
    if args.write_weights:
        weights.write(args.out_dir)
        print(f"stored the retrained weights in {weights.WEIGHTS_DIR}: review and commit them")
        return card
    committed = weights.load(world_config(args.seed, args.scale))
    if committed is None:
        print(f"no committed weights of this configuration (seed {args.seed}, scale {args.scale}) to compare with")
        return card
    differ = weights.compare(args.out_dir, committed)
    if differ:
        print(f"retrained weights DIFFER from the committed ones ({weights.WEIGHTS_DIR}): {', '.join(differ)}; "
              f"numeric environment here: {card['numeric_environment']['cpu_model']}, pinned "
              f"{card['numeric_environment']['pinned']}; committed ones trained on "
              f"{committed['numeric_environment']['cpu_model']}")
        raise SystemExit(1)
    print(f"retrained weights equal the committed ones bit for bit: {', '.join(weights.PARTS)}")
    return card


if __name__ == "__main__":
    from common import numerics
    from common.errors import exit_on_input_error

    _args = parse_args()
    if not _args.no_pin:
        with exit_on_input_error("build_toy_world.py"):
            numerics.pin_process()  # before torch loads, or a re-run of this command under the pin
    main(_args)
