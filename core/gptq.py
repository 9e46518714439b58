"""Error-feedback rounding (GPTQ, Frantar et al. 2022) driven by synthetic inputs instead of data.

Plain rounding treats each weight alone. GPTQ rounds a layer's input columns one after another on
the scheme's own grid and pushes each column's rounding error onto the columns not yet rounded,
weighted by the inverse second moment of the layer's inputs, so the errors cancel in the layer's
output instead of adding up. Here that second moment comes from inputs synthesised to match the
model's BatchNorm statistics (``synthetic.synthetic_inputs``): no image is used. The codes stay the
scheme's codes with the scales plain rounding (or a clipping search) chose, so packed files and
kernels are unchanged.

The one layer that reads the image itself is the exception (``image_prior``): synthesised pixels are
tuned to the BatchNorms downstream, not to look like photos, and the stem's patches carry none of the
correlations photos have. There its moment is natural images' own (``natural_image_moment``), which
lets GPTQ trade errors between neighbouring pixels and colours as a photo would.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.evaluate import run_with_hooks
from bitsweep.schemes import QuantizedTensor, scales_by_row

DAMPING = 0.01  # of the mean diagonal, added to every input second moment: few synthetic images leave it singular
BLOCK = 128  # columns rounded before the rest of the matrix is updated at once
# Natural images (after the model's per-colour normalisation): the correlation of two adjacent pixels of one
# colour, falling as its power with distance, and of two colours at one pixel. On the offline photos: 0.97
# and 0.46-0.55 (ImageNet's colours correlate more); GPTQ's result moved little between 0.5 and 0.8.
NEIGHBOURS, COLOURS = 0.97, 0.8


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s input as ``[groups, samples, n]``: the vectors each group's weight rows are dotted with."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same

    if isinstance(layer, Conv2dSame):
        x = pad_same(x, layer.weight.shape[-2:], layer.stride, layer.dilation)
        padding = 0
    else:
        padding = layer.padding
    patches = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)  # [B, C*kh*kw, L]
    groups = layer.groups
    patches = patches.reshape(x.shape[0], groups, -1, patches.shape[-1])
    return patches.permute(1, 0, 3, 2).reshape(groups, -1, patches.shape[2])


def natural_image_moment(layer: nn.Conv2d) -> torch.Tensor:
    """The second moment ``[groups, n, n]`` of the patches ``layer`` reads from natural images normalised to
    unit variance per colour: ``COLOURS`` between two colours, times ``NEIGHBOURS`` to the power of the two
    pixels' distance (dilation included), in ``F.unfold``'s order (colour, row, column)."""
    colours, (rows, columns) = layer.in_channels // layer.groups, layer.kernel_size
    colour, y, x = (t.flatten() for t in torch.meshgrid(
        torch.arange(colours), torch.arange(rows) * layer.dilation[0], torch.arange(columns) * layer.dilation[1],
        indexing="ij"))
    distance = ((y[:, None] - y[None]).square() + (x[:, None] - x[None]).square()).double().sqrt()
    across = torch.where(colour[:, None] == colour[None], 1.0, COLOURS).double()
    return (across * NEIGHBOURS ** distance).float().expand(layer.groups, -1, -1).contiguous()


def input_moments(model: nn.Module, inputs: torch.Tensor, names, image_prior: bool = False) -> dict[str, torch.Tensor]:
    """Each named Linear/Conv2d's input second moment ``E[x xᵀ]`` per group, ``[groups, n, n]``, over
    one eval pass of ``model`` on ``inputs``; with ``image_prior``, a Conv2d reading ``inputs`` themselves
    (the stem) gets ``natural_image_moment`` instead: for synthesised images."""
    moments = {}

    def accumulate(name, layer, args, output):
        if name in moments:  # a layer called twice adds nothing new to its statistics
            return
        if image_prior and args[0] is inputs and isinstance(layer, nn.Conv2d):
            moments[name] = natural_image_moment(layer)
            return
        columns = _columns(layer, args[0].detach().float())
        moments[name] = columns.transpose(1, 2) @ columns / columns.shape[1]

    with torch.no_grad():
        run_with_hooks(model, inputs, set(names), accumulate)
    return moments


def _grid(start: QuantizedTensor, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight of the ``[rows, n]`` weight matrix, as ``start`` set them."""
    scale, zero = (scales_by_row(t, start.granularity, rows) for t in (start.scale, start.zero_point))
    if start.granularity != "group":
        return scale.expand(rows, n), zero.expand(rows, n)
    group = torch.arange(n) // start.group_size
    return scale[:, group], zero[:, group]


def _inverse_factor(moment: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``moment⁻¹`` (``UᵀU = moment⁻¹``) without forming the inverse:
    with ``V`` the upper-triangular factor ``moment = V Vᵀ`` (the lower factor of the reversed matrix,
    reversed), ``U = V⁻¹``. One factorization and one triangular solve, about half the work of
    inverting and factorizing again (the cost of GPTQ on a 4608-column layer)."""
    upper = torch.linalg.cholesky(moment.flip(-1, -2)).flip(-1, -2)
    identity = torch.eye(moment.shape[-1], dtype=moment.dtype).expand_as(upper)
    return torch.linalg.solve_triangular(upper, identity, upper=True).contiguous()  # LAPACK leaves it column-major


def error_feedback(w: torch.Tensor, moment: torch.Tensor, start: QuantizedTensor,
                   damping: float = DAMPING) -> QuantizedTensor:
    """``start``'s codes redone by GPTQ: ``w``'s columns rounded in order on ``start``'s grid, each one's
    error spread over the later columns of its group through the Cholesky factor of ``moment⁻¹``."""
    groups, n = moment.shape[0], moment.shape[-1]
    rows = w.shape[0]
    if w.numel() == 0 or n == 0:
        return start
    weights = w.detach().double().reshape(groups, rows // groups, n).clone()  # float64: the updates pile up
    scale, zero = (t.reshape(groups, rows // groups, n) for t in _grid(start, rows, n))
    moment = moment.to(torch.float64, copy=True)
    diagonal = moment.diagonal(dim1=1, dim2=2)
    diagonal[diagonal == 0] = 1  # inputs that are always zero: their weights are rounded alone
    diagonal += damping * diagonal.mean(dim=1, keepdim=True)
    factor = _inverse_factor(moment)
    codec, bits = start.codec, start.bits
    codes = torch.empty(groups, rows // groups, n, dtype=start.codes.dtype)
    for first in range(0, n, BLOCK):  # GPTQ's lazy batches: within a block column by column, then one matmul
        last = min(first + BLOCK, n)
        errors = torch.empty(groups, rows // groups, last - first, dtype=torch.float64)
        for j in range(first, last):
            column = weights[:, :, j].reshape(-1, 1)
            s, z = scale[:, :, j].reshape(-1, 1), zero[:, :, j].reshape(-1, 1)
            code = codec.encode(column.float(), s, z, bits)  # schemes work on float32, as in quantize_tensor
            codes[:, :, j] = code.reshape(groups, -1).to(codes.dtype)  # first: decode may work in place
            error = (column - codec.decode(code, s, z, bits)).reshape(groups, -1, 1) / factor[:, j, j, None, None]
            weights[:, :, j + 1:last] -= error * factor[:, None, j, j + 1:last]
            errors[:, :, j - first] = error[:, :, 0]
        weights[:, :, last:] -= errors @ factor[:, first:last, last:]
    return dataclasses.replace(start, codes=codes.reshape(w.shape))
