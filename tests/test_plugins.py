"""The plugin contract: a real third-party distribution, and plugins that break in every way."""

import pytest
import timm
import torch
from conftest import BROKEN, make_distribution

import bitsweep
from bitsweep.registry import PluginWarning, build_registry


def test_example_plugin_adds_a_fourth_scheme():
    scheme = bitsweep.schemes()["normalfloat"]
    entry = bitsweep.get_registry().entries("scheme")["normalfloat"]
    assert (entry.provider.plugin, entry.provider.distribution) == ("normalfloat", "bitsweep-normalfloat")
    from bitsweep_normalfloat import normal_levels

    w = torch.randn(32, 64)
    qt = bitsweep.quantize_tensor(w, "normalfloat", 4)
    levels = normal_levels(4)
    assert qt.scheme == "normalfloat" and levels.numel() == 16 and scheme.code_range(4) == (0, 15)
    normalised = qt.dequantize() / qt.scale[:, None]
    assert torch.allclose(normalised, levels[qt.codes.long()])
    nearest = (w[..., None] / qt.scale[:, None, None] - levels).abs().argmin(-1)
    assert torch.equal(qt.codes.long(), nearest)

    model = timm.create_model("resnet18").eval()
    qm = bitsweep.quantize_model(model, "normalfloat", 3)
    assert len(qm.quantized_layers) == 21 and {qt.scheme for qt in qm.quantized_layers.values()} == {"normalfloat"}


@pytest.mark.slow
def test_example_plugin_is_listed_by_the_cli(run_cli):
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "normalfloat" in line)
    assert "bitsweep-normalfloat" in row and "0.1.0" in row and "scheme" in row


@pytest.fixture
def broken_plugins(tmp_path, monkeypatch):
    for module, source in BROKEN.items():
        make_distribution(tmp_path, f"bitsweep-{module.replace('_', '-')}", module, source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_broken_plugins_cost_one_warning_each_and_nothing_else(broken_plugins):
    with pytest.warns(PluginWarning) as caught:
        registry = build_registry()
        schemes = registry.entries("scheme")
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3, messages
    assert "plugin 'fails_hook' (distribution bitsweep-fails-hook 0.3) failed in register_schemes: " \
           "RuntimeError: disk on fire" in messages[0]
    assert "plugin 'fails_import' (distribution bitsweep-fails-import 0.3) failed to load: " \
           "ModuleNotFoundError" in messages[1]
    assert "plugin 'steals_name' (distribution bitsweep-steals-name 0.3) registers scheme 'symmetric', " \
           "already provided by plugin 'builtin:schemes'" in messages[2]
    assert schemes["symmetric"].provider.plugin == "builtin:schemes"
    assert {"asymmetric", "symmetric", "pow2", "normalfloat"} <= set(schemes)


@pytest.mark.slow
def test_cli_reports_broken_plugins_as_one_line_warnings(broken_plugins, run_cli):
    result = run_cli("plugins", env={"PYTHONPATH": str(broken_plugins)})
    assert result.returncode == 0
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 3 and all(line.startswith("bitsweep: warning: plugin '") for line in warnings)
    assert "asymmetric" in result.stdout and "pow2" in result.stdout
