#!/usr/bin/env python
"""Drawn images of a toy-world concept with their exact masks (MACE's --concept_data and --masks).

    python -m tools.toy_world.masks OUT_DIR [--concept red circle] [--images 16] [--seed 0]

Writes OUT_DIR/images (an imagefolder: PNGs and metadata.jsonl with a ``prompt`` column, the concept's phrasings in
turn) and OUT_DIR/masks (one PNG per image, the same file name, white where the shape was drawn). The drawings are
the world's own (tools.tiny.draw_shape, the same jitter of position and size), so a mask is exact: the pixels whose
colour differs from the plain background (the drawing has no anti-aliasing).
"""

from __future__ import annotations

import argparse
import os
from typing import Tuple

import numpy as np
from PIL import Image

from tools import tiny
from tools.toy_world.world import RESOLUTION, TARGET, caption

BACKGROUND = (128, 128, 128)  # tiny.draw_shape's background


def shape_mask(image: Image.Image, background=BACKGROUND) -> Image.Image:
    """White (255) where ``image`` differs from the plain background, black elsewhere (mode L)."""
    arr = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.where((arr != np.array(background, dtype=arr.dtype)).any(-1), 255, 0).astype(np.uint8))


def write_concept_set(out_dir: str, concept: Tuple[str, str] = TARGET, images: int = 16, seed: int = 0) -> Tuple[str, str]:
    """``images`` drawings of ``concept`` (colour, shape) and their masks; (images folder, masks folder)."""
    colour, shape = concept
    if tiny.COLOURS[colour] == BACKGROUND:
        raise ValueError(f"{colour}: the background's colour, no mask can be read from the drawing")
    rng = np.random.default_rng(seed)
    rows = [(tiny.draw_shape(shape, colour, RESOLUTION, rng, background=BACKGROUND), caption(colour, shape, j))
            for j in range(images)]
    image_dir = tiny.write_caption_folder(os.path.join(out_dir, "images"), rows)
    mask_dir = os.path.join(out_dir, "masks")
    os.makedirs(mask_dir, exist_ok=True)
    for i, (image, _) in enumerate(rows):  # write_caption_folder's names: 00000.png, ...
        shape_mask(image).save(os.path.join(mask_dir, f"{i:05d}.png"))
    return image_dir, mask_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--concept", nargs=2, default=list(TARGET), metavar=("COLOUR", "SHAPE"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.concept[0] not in tiny.COLOURS or args.concept[1] not in tiny.SHAPES:
        p.error(f"--concept {' '.join(args.concept)}: colours {', '.join(tiny.COLOURS)}; shapes {', '.join(tiny.SHAPES)}")
    if args.images < 1:
        p.error(f"--images {args.images}: must be at least 1")
    images, masks = write_concept_set(args.out_dir, tuple(args.concept), args.images, args.seed)
    print(f"images: {images}\nmasks:  {masks}")


if __name__ == "__main__":
    main()
