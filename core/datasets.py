"""The dataset contract: labelled (or label-free) image tensors that plugins provide by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from bitsweep.models import tensor_digest

SPLITS = ("train", "test")
EVALUATION_SPLIT = "test"  # the split a sweep scores models on


@dataclass
class ImageSet:
    """A whole split in memory: small evaluation sets are cheaper as one tensor than as a loader."""

    images: torch.Tensor  # float32 [N, C, H, W], already normalized
    labels: torch.Tensor | None  # int64 [N]; None for label-free (calibration-only) sets
    class_names: list[str]
    # A natural grouping of the classes when the dataset has one (super-class -> class names),
    # shown next to the grouping the cluster step recovers.
    superclasses: dict[str, list[str]] | None = None


class Dataset(ABC):
    """Loads one split of a named image set; registered through the ``register_datasets`` hook."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def load(self, split: str, options: dict, data_config: dict | None = None) -> ImageSet:
        """Return ``split`` ("train" or "test"); raise ``BitsweepError`` naming the fix when data is missing.

        ``data_config`` is timm's ``resolve_data_config`` for the model to be evaluated, for
        datasets that preprocess per model (input size, crop, mean/std); others ignore it.
        """

    def check(self, options: dict) -> None:
        """Raise ``BitsweepError`` naming the fix when ``load`` would fail for bad options or missing data.

        Called for every sweep before any work starts (unless the cells run on an existing Dask cluster,
        whose workers hold the data), so a wrong path is reported in a second rather than after the
        models are loaded; it should look at the data, not read it.
        """


def content_hash(data: ImageSet) -> str:
    """A short sha256 of the tensors' bytes, so caches key on content rather than on a path."""
    tensors = [data.images] + ([data.labels] if data.labels is not None else [])
    digest = tensor_digest(("", tensor) for tensor in tensors)
    digest.update("\n".join(data.class_names).encode())
    return digest.hexdigest()[:16]
