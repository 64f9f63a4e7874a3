"""Experiment trackers, the accelerate way: per-update loss and learning rate, validation scores and images,
Revival Points, and the run's resolved configuration as its hyperparameters.

The trackers write under OUTPUT_DIR/--logging_dir (``--report_to``: tensorboard by default, wandb, all or
none), through ``Accelerator(log_with=...)`` and ``accelerator.log``, on the main process only.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from .errors import InputError

REPORT_TO = ("tensorboard", "wandb", "all", "none")


def check_report_to(report_to: str) -> None:
    """InputError when a requested tracker's package is missing (wandb is optional)."""
    import importlib.util

    if report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise InputError(f"--report_to {report_to}: wandb is not installed (pip install wandb), or use tensorboard")


def log_with(report_to: str) -> Optional[str]:
    """The value for Accelerator(log_with=...)."""
    return None if report_to == "none" else report_to


def _hparam(value):
    """Tracker hyperparameters take numbers, strings and booleans; anything else is shown as a string."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class Tracking:
    """What a run reports to its trackers; every method is a no-op without trackers."""

    def __init__(self, accelerator, project: str, config: dict, enabled: bool):
        self.acc = accelerator
        self.enabled = enabled
        if enabled:
            accelerator.init_trackers(project, config={k: _hparam(v) for k, v in config.items()})

    def updates(self, last_step: int, losses: Sequence[float], lrs: Sequence[float]) -> None:
        """Per optimizer update: the training loss (global-batch mean) and the learning rate it used."""
        if not self.enabled:
            return
        first = last_step - len(losses) + 1
        for i, (loss, lr) in enumerate(zip(losses, lrs)):
            self.acc.log({"train/loss": loss, "train/learning_rate": lr}, step=first + i)

    def validation(self, step: int, name: str, mean: float, threshold: float, chunk: int) -> None:
        if self.enabled:
            self.acc.log({f"validation/{name}_mean": mean, f"validation/{name}_threshold": threshold,
                          "validation/chunk": chunk}, step=step)

    def retention(self, step: int, mean: Optional[float], utility: Optional[float] = None) -> None:
        """The retention prompts' and the utility captions' mean CLIP cosine, for the sets the run has."""
        values = {f"validation/{k}_mean": v for k, v in (("retention", mean), ("utility", utility)) if v is not None}
        if self.enabled and values:
            self.acc.log(values, step=step)

    def utility_fid(self, step: int, fid: dict) -> None:
        """--utility_fid's FID and KID (mean) of the utility captions' images, where a validation has them."""
        values = {f"validation/{k}": fid[k] for k in ("utility_fid", "utility_kid_mean") if fid.get(k) is not None}
        if self.enabled and values:
            self.acc.log(values, step=step)

    def images(self, step: int, images: List) -> None:
        """The main process's validation images as one grid."""
        if not self.enabled or not images or not self.acc.is_main_process:
            return
        import numpy as np
        from diffusers.utils import make_image_grid

        cols = min(len(images), 8)
        rows = -(-len(images) // cols)
        padded = list(images) + [images[0].copy().point(lambda _: 0)] * (rows * cols - len(images))
        grid = np.asarray(make_image_grid(padded, rows=rows, cols=cols))[None]
        for tracker in self.acc.trackers:
            tracker.log_images({"validation/images": grid}, step=step, **(
                {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}))

    def revival(self, step: int, name: str, chunk: int, images_seen: int) -> None:
        if self.enabled:
            self.acc.log({f"revival_point/{name}_chunk": chunk, f"revival_point/{name}_images": images_seen},
                         step=step)
