"""Channel tuning: the quantized model's per-channel float parameters distilled from its fp32 self.

Rounding leaves errors that bias correction only removes on average, per layer. The parameters a
packed file keeps in float32 anyway — biases and the normalisation layers' scales and shifts, one
number per channel — can absorb more of them: they are trained so the quantized model's outputs
match the fp32 model's (KL of the softmax outputs) on the inputs synthesised to match the model's
BatchNorm statistics. The codes and their scales do not move; no image is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEPS, LR = 300, 3e-3  # Adam steps and learning rate
BATCH = 64  # synthetic images per step (all of them when there are fewer)
PIXELS = STEPS * BATCH * 28 * 28  # pixels seen in all: large inputs take fewer steps


def channel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The one-dimensional parameters: biases and the norms' weights and biases."""
    return [p for p in model.parameters() if p.dim() == 1]


def tune_channels(reference: nn.Module, quantized: nn.Module, inputs: torch.Tensor) -> None:
    """Train ``quantized``'s channel parameters (in eval mode) towards ``reference``'s outputs on
    ``inputs``, in place. Seeded: the same inputs give the same parameters."""
    with torch.no_grad():
        target = F.log_softmax(reference(inputs), dim=-1)
    chosen = [p.requires_grad_(True) for p in channel_parameters(quantized)]
    batch = min(BATCH, len(inputs))
    pixels = inputs[0, 0].numel() if inputs.dim() == 4 else 28 * 28  # a vector input counts as a small image
    steps = max(1, min(STEPS, PIXELS // (batch * pixels)))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(chosen, lr=LR)
    quantized.eval()
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randperm(len(inputs), generator=generator)[:batch]
            out = F.log_softmax(quantized(inputs[index]), dim=-1)
            loss = F.kl_div(out, target[index], log_target=True, reduction="batchmean")
            for p, grad in zip(chosen, torch.autograd.grad(loss, chosen)):  # no other parameter's gradient
                p.grad = grad
            optimizer.step()
    for p in chosen:
        p.grad = None
