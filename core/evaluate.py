"""The evaluate step: logits, accuracy against labels, fidelity against fp32, and CPU latency."""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    """Logits for every image, and the wall time per image at this batch size (ms)."""
    model.eval()
    outputs = []
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        outputs.append(model(images[first : first + batch_size]).float())
    elapsed = time.perf_counter() - start
    return torch.cat(outputs), 1000 * elapsed / max(len(images), 1)


@torch.inference_mode()
def latency_batch1(model: nn.Module, images: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one single-image forward pass (after one warm-up)."""
    model.eval()
    model(images[:1])
    times = []
    for i in range(repeats):
        x = images[i % len(images)].unsqueeze(0)
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def accuracy(logits: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """Top-1 and top-5 in percent; empty for label-free data."""
    if labels is None:
        return {}
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return {"top1": 100 * hits[:, 0].float().mean().item(), "top5": 100 * hits.any(dim=1).float().mean().item()}


def fidelity(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Top-1 agreement with the reference (percent) and mean KL(reference || logits) in nats."""
    agreement = 100 * (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    log_p = torch.log_softmax(reference.double(), dim=1)
    log_q = torch.log_softmax(logits.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean().item()
    return {"agreement": agreement, "kl": max(kl, 0.0)}


def run_with_hooks(model: nn.Module, inputs: torch.Tensor, names, hook) -> None:
    """One eval-mode pass of ``model`` with ``hook(name, module, args, output)`` on the named modules."""
    handles = [m.register_forward_hook(functools.partial(hook, n)) for n, m in model.named_modules() if n in names]
    try:
        model.eval()(inputs)
    finally:
        for handle in handles:
            handle.remove()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error of ``output`` against ``reference``, in float64 (norms of large activations
    overflow float32)."""
    output, reference = output.to(torch.float64), reference.to(torch.float64)
    return ((output - reference).norm() / reference.norm()).item()
