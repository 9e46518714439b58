"""Inputs synthesised to match a model's BatchNorm statistics: the data of every data-free step (unless a
user gives real calibration images: ``bitsweep.calibration``).

Recipes (bias correction, GPTQ's statistics, learned rounding), the width allocator and the int8
path's activation ranges all need inputs that look like what the model sees, and no image may be
used. The images are optimised from seeded noise until each BatchNorm's batch mean and variance match
its running statistics (ZeroQ, Cai et al. 2020), plus a class for each image (cross-entropy, classes
spread over the set so it covers many: DeepInversion, Yin et al. 2020), with the first half of the
steps at half the resolution (coarse structure first, at a quarter of the cost). On
EfficientNet-Lite0 (8 images, 30 steps, ``gptq-bias``) that took the KL to fp32 from 0.048 to 0.030
at 6 bits and from 0.61 to 0.43 at 4 bits in half the time, 8 bits staying above 97 % agreement;
DeepInversion's random shifts and flips, and a smoothness prior, made it worse, and are left out.
Small inputs (Fashion-MNIST's 28 x 28) get ZeroQ alone: there the class term cost pow2 6-bit models
half a point of accuracy (README, "Synthetic data").

A set costs minutes for an ImageNet model on a CPU, so it is made once per model weights and
``SyntheticSettings`` and kept on disk in the cache folder (``synthetic/``), where every process --
other cells, later runs, Dask workers -- finds it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bitsweep import __version__
from bitsweep.errors import BitsweepError
from bitsweep.files import atomic_path, cache_dir
from bitsweep.models import weights_hash
from bitsweep.policy import quantizable_layers

STEPS, LR = 30, 0.2  # Adam steps and learning rate
FEWEST, MOST = 8, 1024  # images made: as many pixels as FEWEST of 224 x 224 hold, at most MOST images
BATCH_PIXELS = 64 * 224 * 224  # images optimised together (each batch's statistics matched on its own): memory
CLASSES = 0.05  # weight of the cross-entropy term (BatchNorm matching: 1)
THREADS = 2  # torch threads a set is made with, whatever the caller's: a conv's sums split by thread count, so the
# set's floats (and every result read from it) would otherwise depend on the thread count of whoever made it first
NATURAL_SIDE = 32  # inputs at least this wide and high get the half-resolution start and the class term
_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]  # a changed generator makes new sets
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
    """How much synthetic data to make: ``images`` (None: as many as ``FEWEST`` images of 224 x 224 hold
    in pixels, at most ``MOST``) optimised for ``steps`` Adam steps each."""

    images: int | None = None
    steps: int = STEPS

    def __post_init__(self):
        if self.images is not None and (not isinstance(self.images, int) or self.images < 1):
            raise BitsweepError(f"synthetic images must be a positive whole number, not {self.images!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise BitsweepError(f"synthetic steps must be a whole number >= 0, not {self.steps!r}")

    @classmethod
    def parse(cls, value: SyntheticSettings | dict | None) -> SyntheticSettings | None:
        """Settings from a dict of their fields (as flows.yaml and ``quantize_model`` take them)."""
        if not isinstance(value, dict):
            return value
        unknown = set(value) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise BitsweepError(f"synthetic settings take images and steps, not {', '.join(sorted(unknown))}")
        return cls(**value)


_SETTINGS: contextvars.ContextVar[SyntheticSettings] = contextvars.ContextVar("synthetic", default=SyntheticSettings())
_WATCHERS: list[Callable[[int, int], None]] = []  # see ``watching``


@contextlib.contextmanager
def using(settings: SyntheticSettings | None):
    """Every data-free step inside (in this thread) uses ``settings`` (None: the current ones)."""
    token = _SETTINGS.set(settings or current_settings())
    try:
        yield
    finally:
        _SETTINGS.reset(token)


@contextlib.contextmanager
def watching(callback: Callable[[int, int], None]):
    """Inside, ``callback(done, total)`` follows every optimisation step of any set being made, in any thread:
    what a progress bar needs (the CLI shows one)."""
    _WATCHERS.append(callback)
    try:
        yield
    finally:
        _WATCHERS.remove(callback)


def current_settings() -> SyntheticSettings:
    """The settings of the innermost ``using`` (the defaults outside any)."""
    return _SETTINGS.get()


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


def synthetic_inputs(model: nn.Module, settings: SyntheticSettings | None = None) -> torch.Tensor:
    """Inputs synthesised to match the model's BatchNorm statistics (no real image) with ``settings``
    (default: those of ``using``), made once per model weights: from memory, else from the disk cache,
    else made and kept there."""
    settings = settings or current_settings()
    size = input_size(model)
    images = settings.images or image_count(size)

    def compute():
        path = cache_dir() / "synthetic" / f"{cache_key(model, size, images, settings.steps)}.safetensors"
        if path.exists():
            try:
                return load_file(path)["inputs"]
            except Exception:  # a damaged cache file is made again, not trusted
                log.warning("%s is damaged: making the synthetic set again", path)
        frozen = copy.deepcopy(model).eval()
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
        inputs = synthesize(frozen, size, images, settings.steps)
        with atomic_path(path) as tmp:
            save_file({"inputs": inputs.contiguous()}, str(tmp))
        return inputs

    return _INPUTS.get(model, (size, images, settings.steps), compute)


def cache_key(model: nn.Module, size: tuple[int, ...], images: int, steps: int) -> str:
    """What decides a synthetic set: the weights, its shape and budget, the generator's code, versions."""
    key = {"weights": weights_hash(model), "size": list(size), "images": images, "steps": steps,
           "generator": _SOURCE, "bitsweep": __version__, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm2d with running statistics: one that folds into a conv, and whose statistics inputs can
    be synthesised to match."""
    return isinstance(m, nn.BatchNorm2d) and m.running_var is not None


def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's BatchNorms with running statistics, in module order."""
    return [m for m in model.modules() if is_batchnorm(m)]


def is_natural(size: tuple[int, ...]) -> bool:
    """Whether inputs of ``size`` (without batch) are images large enough to be photos: they get the class term
    and the half-resolution start here, and GPTQ's natural-image statistics for the stem."""
    return len(size) == 3 and min(size[1:]) >= NATURAL_SIDE


def image_count(size: tuple[int, ...]) -> int:
    """How many inputs to synthesise: small images carry few positions each, so more of them."""
    pixels = size[-1] * size[-2] if len(size) == 3 else 224 * 224
    return max(FEWEST, min(MOST, FEWEST * 224 * 224 // pixels))


def synthesize(model: nn.Module, size: tuple[int, ...], images: int | None = None, steps: int = STEPS) -> torch.Tensor:
    """``images`` inputs (default: ``image_count``) whose per-layer batch statistics match the BatchNorm
    running statistics, seeded (see the module's docstring), made on ``THREADS`` threads. Standard-normal inputs
    when the model has no BatchNorm: noise says nothing of the data, and more of it would only teach GPTQ the
    noise."""
    with _threads(THREADS):
        return _synthesize(model, size, images, steps)


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op threads set to ``count`` inside, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synthesize(model: nn.Module, size: tuple[int, ...], images: int | None, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    norms = batchnorms(model)
    if not norms:
        return torch.randn((FEWEST, *size), generator=generator)
    images = images or image_count(size)
    batch = max(1, BATCH_PIXELS // (size[-1] * size[-2] if len(size) == 3 else 224 * 224))
    starts = range(0, images, batch)
    done, total = 0, len(starts) * steps

    def stepped():
        nonlocal done
        done += 1
        for watcher in list(_WATCHERS):
            watcher(done, total)

    return torch.cat([_synthesize_batch(model, norms, size, min(batch, images - start), steps, generator, start,
                                        stepped) for start in starts])


def _synthesize_batch(model: nn.Module, norms: list[nn.BatchNorm2d], size: tuple[int, ...], count: int, steps: int,
                     generator: torch.Generator, first: int, stepped: Callable[[], None]) -> torch.Tensor:
    """One batch of ``synthesize``: images ``first .. first + count`` of the set; ``stepped()`` after each step."""
    natural = is_natural(size)
    x = torch.randn((count, *size), generator=generator)
    coarse = natural and steps >= 4 and _runs_at_half(model, x)
    if coarse:  # the first half of the steps at half the resolution
        x = F.avg_pool2d(x, 2) * 2  # noise of the same spread
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=LR)
    losses = []

    def match(norm, args):
        h = args[0]
        mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        loss = ((mean - norm.running_mean).square().mean()
                + (var.add(norm.eps).sqrt() - norm.running_var.add(norm.eps).sqrt()).square().mean())
        losses.append(loss)

    hooks = [norm.register_forward_pre_hook(match) for norm in norms]
    targets = None
    try:
        with torch.enable_grad():
            for step in range(steps):
                if coarse and step == steps // 2:  # to full resolution, and a fresh optimiser for it
                    x = F.interpolate(x.detach(), size=size[1:], mode="bilinear", align_corners=False)
                    x.requires_grad_(True)
                    optimizer = torch.optim.Adam([x], lr=LR)
                losses.clear()
                optimizer.zero_grad()
                out = model(x)
                loss = torch.stack(losses).sum()
                if natural and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1:
                    if targets is None:  # classes spread over the whole set, so it covers many
                        classes = out.shape[1]
                        targets = (torch.arange(first, first + count) * 7919) % classes  # 7919: prime, spreads
                    loss = loss + CLASSES * F.cross_entropy(out, targets)
                loss.backward()
                optimizer.step()
                stepped()
                if steps >= 10 and (step + 1) % max(1, steps // 5) == 0:
                    log.info("synthetic images %d-%d: step %d of %d, loss %.4g", first, first + count - 1,
                             step + 1, steps, loss.item())
    finally:
        for hook in hooks:
            hook.remove()
    return x.detach()


def _runs_at_half(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the model takes images of half the size (not all do: fixed position embeddings)."""
    try:
        with torch.no_grad():
            model(F.avg_pool2d(x[:1], 2))
    except Exception:
        return False
    return True
