"""Automatic partial precision: data-free sensitivity and a width plan that meets a size budget."""

import importlib
import itertools
import math

import pytest
import torch
from torch import nn

import bitsweep
from bitsweep import BitsweepError
from bitsweep.allocate import allocate, allocate_bits, output_sqnr, sensitivity


def _three_linears():
    """Equal-sized layers; the middle one's rows hold huge weights on two nearly silent inputs, so they
    set its scales without carrying signal: rounding hurts it most."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    with torch.no_grad():
        model[0].weight[:2] *= 0.02
        model[0].bias[:2] = 0
        model[2].weight[:, :2] *= 40
    return model


def test_sensitivity_is_the_layers_output_sqnr():
    model = _three_linears()
    x = torch.randn(32, 64)
    table = output_sqnr(model, "symmetric", (3, 6), inputs=x)
    assert set(table) == {"0", "2", "4"}
    with torch.no_grad():  # independently, for the first layer: its output with and without the quantized weight
        w = bitsweep.quantize_tensor(model[0].weight, "symmetric", 3).dequantize()
        y, noisy = model[0](x), nn.functional.linear(x, w, model[0].bias)
        expected = 10 * math.log10(y.double().square().sum() / (noisy - y).double().square().sum())
    assert table["0"][3] == pytest.approx(expected, rel=1e-6)
    assert all(t[6] > t[3] for t in table.values())
    assert table["2"][3] < table["0"][3] and table["2"][3] < table["4"][3]


def test_the_default_inputs_table_is_measured_once_per_model_weights(monkeypatch):
    """A sweep asks for the same table once per width and recipe; new weights are measured again."""
    allocate_module = importlib.import_module("bitsweep.allocate")
    passes = []
    run = allocate_module.run_with_hooks
    monkeypatch.setattr(allocate_module, "run_with_hooks", lambda *a, **k: (passes.append(1), run(*a, **k))[1])
    model = _three_linears()
    first = output_sqnr(model, "symmetric", (3, 6))
    first["0"][3] = 0.0  # callers get their own copy
    again = output_sqnr(model, "symmetric", (3, 6))
    assert len(passes) == 1 and again["0"][3] != 0.0
    assert output_sqnr(model, "symmetric", (3, 6), inputs=torch.randn(8, 64)) and len(passes) == 2
    with torch.no_grad():
        model[0].weight[:2] *= 50  # no longer nearly silent: the middle layer's inputs change
    changed = output_sqnr(model, "symmetric", (3, 6))
    assert len(passes) == 3 and changed["2"][3] != again["2"][3]


def test_the_most_sensitive_layer_gets_the_most_bits_within_the_budget():
    model = _three_linears()
    plan = allocate(model, "symmetric", budget=4.0, widths=(2, 3, 4, 5, 6, 8))
    assert plan.average_bits <= 4.0
    assert plan.bits["2"] == max(plan.bits.values()) and plan.bits["2"] > min(plan.bits.values())
    # The plan is an ordinary policy: quantize_model honours each width.
    quantized = bitsweep.quantize_model(model, "symmetric", 8, policy=plan.policy())
    assert {name: qt.bits for name, qt in quantized.quantized_layers.items()} == plan.bits


def test_allocation_spends_the_budget_as_well_as_any_choice():
    """Against brute force over every assignment: the same budget, no assignment with less noise."""
    sqnr = {"a": {2: 5.0, 4: 17.0, 8: 40.0}, "b": {2: 2.0, 4: 9.0, 8: 33.0}, "c": {2: 8.0, 4: 20.0, 8: 45.0}}
    sizes = {"a": 100, "b": 300, "c": 50}
    for budget in (2.0, 3.0, 4.0, 5.5, 8.0):
        bits = allocate_bits(sqnr, sizes, budget)
        total = sum(sizes.values())
        assert sum(sizes[n] * b for n, b in bits.items()) <= budget * total

        def noise(choice):
            return sum(10 ** (-sqnr[n][b] / 10) for n, b in choice.items())

        feasible = [dict(zip(sqnr, c)) for c in itertools.product(*(sorted(t) for t in sqnr.values()))
                    if sum(sizes[n] * b for n, b in zip(sqnr, c)) <= budget * total]
        assert noise(bits) <= min(noise(c) for c in feasible) * 1.05


def test_a_budget_below_the_narrowest_width_is_refused():
    with pytest.raises(BitsweepError, match="budget of 1.5 bits per weight is below the narrowest width"):
        allocate_bits({"a": {2: 5.0, 4: 10.0}}, {"a": 10}, 1.5)


def test_layers_kept_fp32_by_the_policy_are_left_out():
    model = _three_linears()
    plan = allocate(model, "asymmetric", budget=3.0, widths=(2, 4), policy={"keep_first": 1})
    assert set(plan.bits) == {"2", "4"}
    quantized = bitsweep.quantize_model(model, "asymmetric", 8, policy=plan.policy())
    assert "0" not in quantized.quantized_layers


def test_an_allocate_policy_quantizes_at_the_widths_allocate_picks_for_the_cells_bits():
    model = _three_linears()
    for recipe in (None, "bias"):
        quantized = bitsweep.quantize_model(model, "asymmetric", 4, policy={"allocate": True, "keep_first": 1},
                                            recipe=recipe)
        expected = allocate(model, "asymmetric", budget=4, policy={"keep_first": 1}).bits
        widths = {name: qt.bits for name, qt in quantized.quantized_layers.items()}
        assert widths == expected and len(set(widths.values())) > 1  # the budget spent unevenly, layer 0 left fp32
        sizes = {name: qt.codes.numel() for name, qt in quantized.quantized_layers.items()}
        assert sum(sizes[n] * widths[n] for n in sizes) <= 4 * sum(sizes.values())


def test_policies_without_allocate_serialise_as_before_so_resume_keys_stay_valid():
    assert "allocate" not in bitsweep.Policy.parse({"keep_first": 1}).model_dump(mode="json")
    assert bitsweep.Policy.parse({"allocate": True}).model_dump(mode="json")["allocate"] is True


def test_an_allocate_policy_with_its_own_widths_is_refused():
    with pytest.raises(ValueError, match="allocate chooses every layer's width itself; drop either bits or allocate"):
        bitsweep.Policy.parse({"allocate": True, "bits": {"0": 8}})


def test_sensitivity_is_the_deprecated_name_of_output_sqnr():
    model = _three_linears()
    x = torch.randn(8, 64)
    with pytest.warns(DeprecationWarning, match="output_sqnr"):
        old = sensitivity(model, "symmetric", (3, 6), inputs=x)
    assert old == output_sqnr(model, "symmetric", (3, 6), inputs=x)
