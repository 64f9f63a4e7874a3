"""The toy world: the paper's whole pipeline, trained from a seed on 2 CPU cores.

world.py defines it (concepts, captions, sizes, paths, its card), clip.py,
sd.py and classifier.py train its models, weights.py keeps the trained ones (committed
in weights/), build.py assembles and caches it.
"""

from .build import build_toy_world, format_card
from .classifier import classifier_batch
from .clip import retrieval_top1
from .weights import WEIGHTS_DIR
from .world import (CARD_FILE, CONCEPTS, CURRICULUM, DEFAULT_DIR, NEIGHBOURS, PER_CONCEPT, RELATED, RESOLUTION,
                    RETAINED, RETENTION, SCALES, TARGET, UNLEARN_METHODS, UNRELATED, VALIDATION_REPEATS, caption,
                    concept_prompts, draw_concepts, load_card, paths, world_config, write_audit_preset)

__all__ = ["build_toy_world", "format_card", "classifier_batch", "retrieval_top1", "WEIGHTS_DIR", "CARD_FILE", "CONCEPTS",
           "CURRICULUM", "DEFAULT_DIR", "NEIGHBOURS", "PER_CONCEPT", "RELATED", "RESOLUTION", "RETAINED", "RETENTION", "SCALES",
           "TARGET", "UNLEARN_METHODS", "UNRELATED", "VALIDATION_REPEATS", "caption", "concept_prompts",
           "draw_concepts", "load_card", "paths", "world_config", "write_audit_preset"]
