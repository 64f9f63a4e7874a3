#!/usr/bin/env python
"""Build (or reuse) the toy world: a fully trained miniature in which the paper pipeline runs on a CPU.

    python tools/build_toy_world.py                    # toy_world/ at the repo root, about 12 min on 2 cores
    python tools/build_toy_world.py --scale reduced    # same world, tiny step counts (about a minute)
    python tools/build_toy_world.py --force            # rebuild even when the cached world is current
    python tools/build_toy_world.py --no_pin           # torch's own kernels and threads: machine-dependent bits

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
    p.add_argument("--no_pin", action="store_true",
                   help="do not pin the numeric environment (faster on a big machine; its bits then differ from "
                        "the pinned world's and from machine to machine)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """Build or reuse the world; return its card."""
    from tools.toy_world import build_toy_world

    return build_toy_world(args.out_dir, seed=args.seed, scale=args.scale, force=args.force)


if __name__ == "__main__":
    from common import numerics
    from common.errors import exit_on_input_error

    _args = parse_args()
    if not _args.no_pin:
        with exit_on_input_error("build_toy_world.py"):
            numerics.pin_process()  # before torch loads, or a re-run of this command under the pin
    main(_args)
