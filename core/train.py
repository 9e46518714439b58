"""Train small timm classifiers from scratch, deterministically, so a sweep has real fp32 baselines offline."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import timm
import torch
import torch.nn.functional as F

from bitsweep.datasets import ImageSet
from bitsweep.errors import BitsweepError


@dataclass(frozen=True)
class TrainingSettings:
    """Everything besides architecture, data and seed that decides the trained weights."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # "adamw" or "sgd" (Nesterov, momentum 0.9)
    warmup_fraction: float = 0.05  # linear warm-up, then cosine decay to zero, per step
    label_smoothing: float = 0.0
    hflip: bool = True  # random horizontal flips: free, and right for clothes and natural images


def classifier_kwargs(arch: str, num_classes: int, in_chans: int, image_size: int, **model_kwargs) -> dict:
    """The ``timm.create_model`` keyword arguments that build ``arch`` for this data, and rebuild it later."""
    cfg = timm.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    if cfg is None:
        raise BitsweepError(f"unknown timm architecture {arch!r}; see `timm.list_models()` for valid names")
    if cfg.fixed_input_size:  # ViTs and friends are built for one input size
        model_kwargs.setdefault("img_size", image_size)
    return {"num_classes": num_classes, "in_chans": in_chans, **model_kwargs}


def train_classifier(arch: str, data: ImageSet, settings: TrainingSettings, seed: int,
                     model_kwargs: dict | None = None) -> torch.nn.Module:
    """Train ``arch`` on ``data``; the same inputs and thread count give a bitwise-identical state_dict.

    The global RNG is forked, so training neither depends on nor disturbs the caller's random state.
    """
    if data.labels is None:
        raise BitsweepError("train_classifier needs a labelled dataset; this one has no labels")
    n, in_chans, height, _ = data.images.shape
    steps_per_epoch = n // settings.batch_size
    if steps_per_epoch == 0:
        raise BitsweepError(f"batch_size {settings.batch_size} is larger than the {n} training images")
    total = steps_per_epoch * settings.epochs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs = classifier_kwargs(arch, len(data.class_names), in_chans, height, **(model_kwargs or {}))
        model = timm.create_model(arch, pretrained=False, **kwargs)
        optimizer = _optimizer(model, settings)
        warmup = max(1, round(total * settings.warmup_fraction))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
        model.train()
        for _ in range(settings.epochs):
            order = torch.randperm(n)
            for step in range(steps_per_epoch):
                index = order[step * settings.batch_size:(step + 1) * settings.batch_size]
                images, labels = data.images[index], data.labels[index]
                if settings.hflip:
                    flip = torch.rand(len(index)) < 0.5
                    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
                loss = F.cross_entropy(model(images), labels, label_smoothing=settings.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def _optimizer(model: torch.nn.Module, settings: TrainingSettings) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-d parameters): decaying them only hurts small models.
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9, nesterov=True)
    raise BitsweepError(f"unknown optimizer {settings.optimizer!r}; use adamw or sgd")


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def training_key(arch: str, settings: TrainingSettings, seed: int, data_hash: str, model_kwargs: dict | None = None) -> str:
    """A short cache key for a trained checkpoint: everything that decides its weights, versions included."""
    # "recipe": the settings' key since the first cached checkpoints; renaming it would retrain them all.
    key = {"arch": arch, "model_kwargs": model_kwargs or {}, "recipe": asdict(settings), "seed": seed,
           "data": data_hash, "torch": torch.__version__, "timm": timm.__version__,
           "threads": torch.get_num_threads()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
