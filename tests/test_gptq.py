"""GPTQ error-feedback rounding: the same codes as the paper's algorithm written out independently, input
statistics that reproduce each layer's own output moments, and a lower output error than plain rounding."""

import pytest
import torch
from conftest import SCHEMES
from timm.layers import Conv2dSame
from torch import nn

from bitsweep.gptq import BLOCK, DAMPING, error_feedback, input_moments
from bitsweep.schemes import quantize_tensor


def correlated_inputs(samples, features, seed):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    return torch.randn(samples, features, generator=generator) @ mixing + 0.5


def reference_gptq(w, moment, start, damping=DAMPING):
    """OBQ/GPTQ as in Frantar et al.: explicit inverse, each rounded column removed by a rank-one update."""
    weights = w.double().clone()
    moment = moment.double().clone()
    diagonal = moment.diagonal()
    diagonal[diagonal == 0] = 1
    diagonal += damping * diagonal.mean()
    inverse = torch.linalg.inv(moment)
    scale, zero = start.scale.reshape(-1, 1).float(), start.zero_point.reshape(-1, 1).float()
    codes = torch.empty_like(start.codes)
    for j in range(w.shape[1]):
        code = start.codec.encode(weights[:, j:j + 1].float(), scale, zero, start.bits)
        codes[:, j] = code[:, 0].to(codes.dtype)
        value = start.codec.decode(code, scale, zero, start.bits)[:, 0].double()
        error = (weights[:, j] - value) / inverse[j, j]
        weights[:, j + 1:] -= error[:, None] * inverse[j, j + 1:][None, :]
        inverse = inverse - inverse[:, j:j + 1] @ inverse[j:j + 1, :] / inverse[j, j]
    return codes


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits, features", [(3, 48), (4, 48), (8, 48), (4, BLOCK * 2 + 44)])  # and several blocks
def test_codes_equal_the_papers_algorithm(scheme, bits, features):
    x = correlated_inputs(4 * features, features, seed=bits)
    w = torch.randn(24, features, generator=torch.Generator().manual_seed(1))
    moment = x.T @ x / len(x)
    start = quantize_tensor(w, scheme, bits)
    ours = error_feedback(w, moment[None], start)
    assert torch.equal(ours.codes, reference_gptq(w, moment, start))
    assert torch.equal(ours.scale, start.scale) and torch.equal(ours.zero_point, start.zero_point)
    assert not torch.equal(ours.codes, start.codes)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity, group_size", [("channel", None), ("group", 16), ("tensor", None)])
def test_output_error_is_lower_than_plain_rounding(scheme, granularity, group_size):
    x = correlated_inputs(2048, 64, seed=7)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    start = quantize_tensor(w, scheme, 4, granularity, group_size)
    ours = error_feedback(w, (x.T @ x / len(x))[None], start)
    plain_error = (x @ (start.dequantize() - w).T).square().mean()
    our_error = (x @ (ours.dequantize() - w).T).square().mean()
    assert our_error < 0.7 * plain_error, (our_error, plain_error)
    assert ours.codes.dtype == start.codes.dtype
    assert start.qmin <= int(ours.codes.min()) and int(ours.codes.max()) <= start.qmax


def test_input_moments_give_each_layers_own_output_moments():
    """For any weight V of a layer, E[y yᵀ] of its output equals V M Vᵀ with M its input moment,
    checked through the layer's own forward: strides, padding, TF 'same' padding and groups."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU(),
                          Conv2dSame(6, 6, 3, stride=2, groups=3, bias=False), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.Flatten(), nn.LazyLinear(5, bias=False))
    x = torch.randn(5, 4, 15, 15)
    model(x)
    names = ["0", "2", "4", "6"]
    moments = input_moments(model, x, names)
    inputs = {}
    handles = [model[int(n)].register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, (a[0], o)))
               for n in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for name in names:
        layer = model[int(name)]
        _, output = inputs[name]
        groups = getattr(layer, "groups", 1)
        per_group = layer.weight.shape[0] // groups
        flat = output.transpose(1, -1).reshape(-1, output.shape[1]) if output.dim() == 4 else output
        assert moments[name].shape[0] == groups
        for g in range(groups):
            y = flat[:, g * per_group:(g + 1) * per_group]
            v = layer.weight[g * per_group:(g + 1) * per_group].reshape(per_group, -1).detach()
            torch.testing.assert_close(v @ moments[name][g] @ v.T, y.T @ y / len(y), rtol=1e-4, atol=1e-4)
