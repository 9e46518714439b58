"""The command line as a user meets it: version, one-line errors, exit status 2."""

import pytest

import bitsweep


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
