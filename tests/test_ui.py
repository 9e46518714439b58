"""The Prefect UI, in headless Chromium (Debian's `chromium`), shows the deployed sweep's flow run and its
results table. Screenshots go to the test's tmp_path and to test-output/ at the project root."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a Prefect server, a deployed sweep and headless Chromium

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


def render(url: str, screenshot: Path, profile: Path) -> str:
    """The page's text once its scripts have run (virtual time lets the app fetch and draw), and a screenshot."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=15000",
               f"--screenshot={screenshot}", "--dump-dom", url]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_ui_shows_the_flow_run_and_its_results_table(deployed_run, prefect_server, tmp_path):
    run_id = deployed_run.flow_run_id
    flow_run = prefect_server.get(f"/flow_runs/{run_id}")
    artifacts = prefect_server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    artifact = next(a for a in artifacts if a["key"] == "tiny-results")
    rows = json.loads(artifact["data"])
    OUTPUT.mkdir(exist_ok=True)

    page = render(f"{prefect_server.url}/runs/flow-run/{run_id}", tmp_path / "flow-run.png", tmp_path / "profile1")
    assert f"Flow Run: {flow_run['name']}" in page  # the page title, set once the run is loaded
    assert re.search(rf"{flow_run['name']} Completed ", page), page[:500]
    assert "Deployment tiny-nightly" in page and "Work Pool bitsweep" in page
    assert "evaluate test_efficientnet pow2 4b" in page  # task-run logs are listed

    table = render(f"{prefect_server.url}/artifacts/artifact/{artifact['id']}", tmp_path / "results-artifact.png",
                   tmp_path / "profile2")
    assert "tiny-results" in table and "results of sweep tiny" in table and f"Flow Run {flow_run['name']}" in table
    assert f"{len(rows)} Items" in table
    for row in rows:  # every row's content key, in the order of the table
        assert row["key"] is None or row["key"] in table
    assert [m.group(1) for m in re.finditer(r" test_efficientnet (fp32|asymmetric|pow2) ", table)] == \
        [r["scheme"] for r in rows]

    for shot in ("flow-run.png", "results-artifact.png"):
        assert (tmp_path / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        shutil.copy(tmp_path / shot, OUTPUT / shot)
