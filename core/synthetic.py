"""Inputs synthesised to match a model's BatchNorm statistics: the data of every data-free step.

Recipes (bias correction, GPTQ's statistics), the width allocator and the int8 path's activation
ranges all need inputs that look like what the model sees, and no image may be used: ZeroQ's
distilled data (Cai et al. 2020), optimised from seeded noise until each BatchNorm's batch mean and
variance match its running statistics.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from bitsweep.models import weights_hash
from bitsweep.policy import quantizable_layers

STEPS, LR = 30, 0.2  # Adam steps and learning rate
FEWEST, MOST = 8, 1024  # images made: as many pixels as FEWEST of 224 x 224 hold, at most MOST images


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """Channels of the first conv and the height and width of timm's config (224 when it has none)."""
    config = getattr(model, "pretrained_cfg", None) or {}
    _, height, width = config.get("input_size", (3, 224, 224))
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (first.in_channels if first is not None else 3, height, width)


def input_size(model: nn.Module) -> tuple[int, ...]:
    """The input shape (without batch) the model expects: a ViT's own image size, a plain MLP's
    features, else timm's config."""
    first = next((m for _, m in quantizable_layers(model)), None)
    if isinstance(first, nn.Linear) and getattr(model, "patch_embed", None) is None:
        return (first.in_features,)
    channels, height, width = default_input_size(model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        height, width = size if isinstance(size, (tuple, list)) else (size, size)
    return channels, height, width


class PerModelCache:
    """The last few results of a costly data-free measurement, keyed by the model's weights and the
    measurement's arguments: a sweep asks for the same one once per width and recipe. Computed under
    the lock, so concurrent cells wait for one computation rather than each doing it."""

    def __init__(self, size: int = 4):
        self._items: dict[tuple, object] = {}
        self._size = size
        self._lock = threading.Lock()

    def get(self, model: nn.Module, key: tuple, compute):
        key = (weights_hash(model), *key)
        with self._lock:
            if key not in self._items:
                if len(self._items) >= self._size:
                    self._items.pop(next(iter(self._items)))
                self._items[key] = compute()
            return self._items[key]


_INPUTS = PerModelCache()


def synthetic_inputs(model: nn.Module) -> torch.Tensor:
    """Inputs synthesised to match the model's BatchNorm statistics (no real image), cached per model
    weights: each recipe and the allocator reuse them rather than synthesising again."""
    size = input_size(model)

    def compute():
        frozen = copy.deepcopy(model).eval()
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
        return synthesize(frozen, size)

    return _INPUTS.get(model, (size,), compute)


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm2d with running statistics: one that folds into a conv, and whose statistics inputs can
    be synthesised to match."""
    return isinstance(m, nn.BatchNorm2d) and m.running_var is not None


def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's BatchNorms with running statistics, in module order."""
    return [m for m in model.modules() if is_batchnorm(m)]


def image_count(size: tuple[int, ...]) -> int:
    """How many inputs to synthesise: small images carry few positions each, so more of them."""
    pixels = size[-1] * size[-2] if len(size) == 3 else 224 * 224
    return max(FEWEST, min(MOST, FEWEST * 224 * 224 // pixels))


def synthesize(model: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """Inputs whose per-layer batch statistics match the BatchNorm running stats (ZeroQ's distilled
    data, seeded). Falls back to standard-normal inputs when the model has no BatchNorm."""
    generator = torch.Generator().manual_seed(0)
    norms = batchnorms(model)
    if not norms:  # noise says nothing of the data: more of it would only teach GPTQ the noise
        return torch.randn((FEWEST, *size), generator=generator)
    x = torch.randn((image_count(size), *size), generator=generator)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=LR)
    losses = []

    def match(norm, args):
        h = args[0]
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        losses.append((mean - norm.running_mean).square().mean()
                      + (var.add(norm.eps).sqrt() - norm.running_var.add(norm.eps).sqrt()).square().mean())

    hooks = [norm.register_forward_pre_hook(match) for norm in norms]
    try:
        with torch.enable_grad():
            for _ in range(STEPS):
                losses.clear()
                optimizer.zero_grad()
                model(x)
                torch.stack(losses).sum().backward()
                optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    return x.detach()
