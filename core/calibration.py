"""The images every data-free step reads -- recipes, the width allocator, the int8 path's activation
ranges: a user's real calibration images when they give some (the convention of AIMET, NNCF and
Brevitas), else inputs synthesised for the model (``bitsweep.synthetic``).

Calibration images are drawn with a fixed seed and are never evaluation images: ``draw`` refuses a
set that shares any image with the evaluation data, byte for byte.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib

import torch
from torch import nn

from bitsweep.datasets import ImageSet
from bitsweep.errors import BitsweepError
from bitsweep.models import tensor_digest
from bitsweep.synthetic import current_settings, synthetic_inputs

CALIBRATION_IMAGES = 64  # drawn from the calibration split unless a sweep says otherwise

_IMAGES: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("calibration", default=None)


def checked(images) -> torch.Tensor:
    """``images`` if they can calibrate a model (a float tensor of at least one input), else one line why."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() < 2 \
            or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise BitsweepError(f"calibration images must be a float tensor [N, C, H, W] (or [N, features]) of the "
                            f"model's preprocessed inputs with N >= 1, not {shape}")
    if not torch.isfinite(images).all():
        raise BitsweepError("calibration images hold NaN or infinite values; pass preprocessed images")
    return images


@contextlib.contextmanager
def calibrating(images: torch.Tensor | None):
    """Every data-free step inside (in this thread) reads ``images``; None keeps what is in force."""
    token = _IMAGES.set(_IMAGES.get() if images is None else checked(images))
    try:
        yield
    finally:
        _IMAGES.reset(token)


def calibration_inputs(model: nn.Module) -> torch.Tensor:
    """The inputs data-free steps read: the images of ``calibrating``, else those synthesised for ``model``."""
    images = _IMAGES.get()
    return images if images is not None else synthetic_inputs(model)


def synthesised() -> bool:
    """Whether the data-free steps read synthesised inputs (no calibration images in force)."""
    return _IMAGES.get() is None


def inputs_key() -> tuple:
    """What decides ``calibration_inputs`` for a given model: part of the key of anything measured on them."""
    images = _IMAGES.get()
    if images is None:
        return ("synthetic", current_settings())
    return ("real", tensor_digest([("", images)]).hexdigest()[:16])


def draw(data: ImageSet, count: int, source: str, evaluation: ImageSet | None = None) -> torch.Tensor:
    """``count`` images of ``data`` (named ``source`` in errors) drawn with a fixed seed; one line when it
    holds fewer, or when any drawn image is also one of ``evaluation``'s."""
    if len(data.images) < count:
        raise BitsweepError(f"calibration: {source} holds {len(data.images)} images, fewer than the {count} asked "
                            f"for; lower calibration images: or calibrate on a larger split")
    chosen = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:count]]
    if evaluation is not None and chosen.shape[1:] != evaluation.images.shape[1:]:
        raise BitsweepError(f"calibration: {source} holds images of {tuple(chosen.shape[1:])}, the evaluation "
                            f"images are {tuple(evaluation.images.shape[1:])}; calibrate on images of that size")
    if evaluation is not None:
        shared = _fingerprints(chosen) & _fingerprints(evaluation.images)
        if shared:
            raise BitsweepError(f"calibration: {len(shared)} of the {count} images drawn from {source} are also "
                                f"evaluation images; calibrate on data the sweep does not evaluate on")
    return chosen


def _fingerprints(images: torch.Tensor) -> set[bytes]:
    return {hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest() for image in images}
