"""The command line as a user meets it: version, one-line errors, exit status 2."""

import pytest

import bitsweep

pytestmark = pytest.mark.slow  # each test runs `bitsweep` in a fresh interpreter


def test_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"bitsweep {bitsweep.__version__}"


@pytest.mark.parametrize("args, message", [
    (["quantize", "resnet18", "--scheme", "int3"],
     "bitsweep: error: unknown scheme 'int3'; available: asymmetric, normalfloat, pow2, symmetric"),
    (["quantize", "resnet18", "--bits", "9"], "bitsweep: error: bits=9 is outside 2..8"),
    (["quantize", "resnet18", "-g", "row"], "bitsweep: error: unknown granularity 'row'"),
    (["quantize", "resnt18"], "bitsweep: error: unknown timm model 'resnt18'; did you mean resnet18"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, run_cli):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stdout + result.stderr


def test_quantize_command_reports_every_layer(run_cli):
    result = run_cli("quantize", "resnet18", "-s", "pow2", "-b", "5", "--keep-first", "1")
    assert result.returncode == 0, result.stderr
    assert "20 of 21 Conv/Linear layers quantized with pow2 5-bit per channel" in result.stdout
    conv1 = next(line for line in result.stdout.splitlines() if "│ conv1 " in line)
    assert "fp32" in conv1


@pytest.mark.parametrize("sweep, message", [
    ("{name: a, models: [resnt18], dataset: {name: synthetic}, schemes: [pow2], bits: [4]}",
     "bitsweep: error: unknown timm model 'resnt18'; did you mean resnet18"),
    ("{name: a, models: [{source: trained, name: test_efficientnet}], dataset: {name: fashion-mnist, path: /nope},"
     " schemes: [pow2], bits: [4]}",
     "bitsweep: error: Fashion-MNIST not found at /nope"),
    ("{name: a, models: [resnet18], dataset: {name: imagefolder, path: /nope}, schemes: [pow2], bits: [4]}",
     "bitsweep: error: dataset 'imagefolder': path /nope is not a directory"),
    ("{name: a, models: [resnet18], dataset: {name: photos, view: 4}, schemes: [pow2], bits: [4]}",
     "bitsweep: error: dataset 'photos': unknown option(s) view; allowed: views"),
    ("{name: a, models: [resnet18], dataset: {name: synthetic}, schemes: [pow2], bits: [4, 9]}",
     "bitsweep: error: flows.yaml: sweeps[0].bits[1]: 9 is outside 2..8"),
    ("{name: a, models: [resnet18], dataset: {name: synthetic}, schemes: [pow2], bits: [4",
     "bitsweep: error: flows.yaml: line 3: not valid YAML (expected ',' or ']'"),
])
def test_run_refuses_bad_input_in_one_line(sweep, message, tmp_path, run_cli):
    (tmp_path / "flows.yaml").write_text(f"sweeps:\n  - {sweep}\n")
    result = run_cli("run", cwd=tmp_path, env={"BITSWEEP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists(), "refused before the sweep started"
