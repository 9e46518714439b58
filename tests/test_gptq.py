"""GPTQ error-feedback rounding: the same codes as the paper's algorithm written out independently, input
statistics that reproduce each layer's own output moments, and a lower output error than plain rounding;
natural images' statistics for a stem that would otherwise read synthesised pixels."""

import pytest
import torch
import torch.nn.functional as F
from conftest import SCHEMES, conv_bn_net
from timm.layers import Conv2dSame
from torch import nn

import bitsweep
from bitsweep.gptq import BLOCK, COLOURS, DAMPING, NEIGHBOURS, error_feedback, input_moments, natural_image_moment
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


def test_natural_image_moment_correlates_pixels_by_distance_and_colours_by_a_constant():
    """Entries read from the definition, in ``F.unfold``'s (colour, row, column) order, dilation included."""
    moment = natural_image_moment(nn.Conv2d(3, 8, 3, dilation=(1, 2)))
    assert moment.shape == (1, 27, 27)
    m = moment[0].double()
    index = lambda colour, row, column: colour * 9 + row * 3 + column  # noqa: E731
    assert torch.equal(m.diagonal(), torch.ones(27, dtype=torch.float64))
    assert m[index(0, 0, 0), index(0, 1, 0)] == pytest.approx(NEIGHBOURS, rel=1e-6)  # one row down
    assert m[index(0, 0, 0), index(0, 0, 1)] == pytest.approx(NEIGHBOURS ** 2, rel=1e-6)  # one tap: 2 pixels
    assert m[index(1, 0, 0), index(2, 1, 1)] == pytest.approx(COLOURS * NEIGHBOURS ** 5 ** 0.5, rel=1e-6)
    assert torch.equal(m, m.T)
    torch.linalg.cholesky(m)  # a second moment: positive definite
    assert natural_image_moment(nn.Conv2d(4, 4, 3, groups=2)).shape == (2, 18, 18)


def smooth_photos(count, side, seed):
    """Images with photos' kind of statistics: coarse noise blown up smoothly, colours mixed."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, side // 8, side // 8, generator=generator)
    smooth = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    mixing = torch.tensor([[1.0, 0.6, 0.5], [0.6, 1.0, 0.6], [0.5, 0.6, 1.0]])
    return torch.einsum("dc,nchw->ndhw", mixing, smooth)


def test_the_image_prior_lowers_a_stems_output_error_on_smooth_photos_where_noise_cannot():
    """GPTQ on white noise's moment (the identity) rounds as plain rounding does; on the natural-image moment it
    cuts the stem's output error on images with photos' correlations, which it never saw."""
    stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
    torch.nn.init.normal_(stem.weight, generator=torch.Generator().manual_seed(5))
    w = stem.weight.detach()
    photos = smooth_photos(16, 64, seed=6)

    def error(weight):
        return (F.conv2d(photos, weight - w, stride=2, padding=1)).square().mean()

    start = quantize_tensor(w, "asymmetric", 4)
    white = error_feedback(w, torch.eye(27)[None], start)
    natural = error_feedback(w, natural_image_moment(stem), start)
    assert torch.equal(white.codes, start.codes)
    assert error(natural.dequantize()) < 0.5 * error(start.dequantize())  # 0.06-0.15 seen


def test_input_moments_use_the_image_prior_only_for_the_layer_reading_the_inputs():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                          nn.LazyLinear(3))
    x = torch.randn(2, 3, 16, 16)
    model(x)
    names = ["0", "2", "4"]
    plain, prior = input_moments(model, x, names), input_moments(model, x, names, image_prior=True)
    assert torch.equal(prior["0"], natural_image_moment(model[0]))
    assert not torch.equal(plain["0"], prior["0"])
    for name in ("2", "4"):
        assert torch.equal(plain[name], prior[name])


def test_gptq_recipes_give_the_stem_the_image_prior_with_synthetic_images_only():
    """Codes of the stem, exactly: on synthesised 32 x 32 images the prior's GPTQ; on a user's calibration
    images, GPTQ on those images' own moment."""
    model = conv_bn_net()
    w = model[0].weight.detach()
    start = quantize_tensor(w, "asymmetric", 4)
    synthetic = bitsweep.quantize_model(model, "asymmetric", 4, recipe="gptq", synthetic={"images": 2, "steps": 1})
    expected = error_feedback(w, natural_image_moment(model[0]), start)
    assert torch.equal(synthetic.quantized_layers["0"].codes, expected.codes)
    images = smooth_photos(4, 32, seed=7)
    calibrated = bitsweep.quantize_model(model, "asymmetric", 4, recipe="gptq", calibration=images)
    own = input_moments(model, images, ["0"])["0"]
    assert torch.equal(calibrated.quantized_layers["0"].codes, error_feedback(w, own, start).codes)
    assert not torch.equal(calibrated.quantized_layers["0"].codes, expected.codes)
