"""The report from a real finished run: figures tested through their data, tables, and `bitsweep report`."""

import json
import os
import shutil
import warnings

import pytest
import torch
import yaml
from PIL import Image

from bitsweep import figures
from bitsweep.profile import WHOLE_MODEL
from bitsweep.report import grouping_table, load_run, same_partition, summary_table, superclass_table


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_harness):
    from bitsweep.flows.sweep import sweep_flow

    root = tmp_path_factory.mktemp("report")
    config = {"sweeps": [{
        "name": "report", "models": [{"source": "trained", "name": "test_efficientnet", "epochs": 1, "batch_size": 64}],
        "dataset": {"name": "synthetic", "n": 256, "num_classes": 4, "size": 16},
        "schemes": ["asymmetric", "pow2"], "bits": [8, 4], "compressors": ["gzip", "7z"],
        "evaluation": {"latency_repeats": 2}, "sensitivity": {"images": 64}, "output": str(root / "run")}]}
    (root / "flows.yaml").write_text(yaml.safe_dump(config))
    os.environ["BITSWEEP_CACHE"] = str(root / "cache")
    try:
        sweep_flow(config_path=str(root / "flows.yaml"))
    finally:
        del os.environ["BITSWEEP_CACHE"]
    return root / "run"


@pytest.mark.slow
def test_bit_limit_series_are_the_rows(finished_run):
    run = load_run(finished_run)
    data = figures.bit_limit_data(run["rows"])["test_efficientnet"]
    assert set(data["lines"]) == {"asymmetric", "pow2"}
    for scheme, points in data["lines"].items():
        expected = sorted((r["bits"], r["top1"]) for r in run["rows"] if r["scheme"] == scheme)
        assert points == expected and [b for b, _ in points] == [4, 8]
    assert data["fp32"] == next(r["top1"] for r in run["rows"] if r["scheme"] == "fp32")


@pytest.mark.slow
def test_pareto_front_is_exactly_the_undominated_cells(finished_run):
    data = figures.pareto_data(load_run(finished_run)["rows"])["test_efficientnet"]
    assert len(data["points"]) == 5  # fp32 and four cells
    for p in data["points"]:
        beaten = any(q[0] <= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in data["points"])
        if p in data["front"]:
            assert not beaten
        else:
            assert any(q[0] <= p[0] and q[1] >= p[1] for q in data["front"])
    assert figures.pareto_front([(1, 50, "a"), (2, 40, "b"), (2, 60, "c"), (3, 60, "d"), (4, 70, "e")]) == [
        (1, 50, "a"), (2, 60, "c"), (4, 70, "e")]


@pytest.mark.slow
def test_box_and_sensitivity_data_are_the_profile(finished_run):
    profile = load_run(finished_run)["profile"]
    layers = figures.chosen_layers(profile, "test_efficientnet")
    all_layers = [r["layer"] for r in profile if r["scheme"] == "fp32" and r["layer"] != WHOLE_MODEL]
    assert layers == [all_layers[0], all_layers[len(all_layers) // 2], all_layers[-1]]
    boxes = figures.box_data(profile, "test_efficientnet", 4, layers)
    for layer in layers:
        labels = [label for label, _ in boxes["layers"][layer]]
        assert labels == ["fp32", "asymmetric", "pow2"]
        for label, stats in boxes["layers"][layer]:
            scheme, bits = ("fp32", 32) if label == "fp32" else (label, 4)
            assert stats == next(r for r in profile if (r["layer"], r["scheme"], r["bits"]) == (layer, scheme, bits))
    panel = figures.weight_sqnr_data(profile, "test_efficientnet", "asymmetric")
    assert panel["layers"] == all_layers and panel["bits"] == [8, 4]
    for layer, values in zip(panel["layers"], panel["values"]):
        for bits, value in zip(panel["bits"], values):
            row = next(r for r in profile if (r["layer"], r["scheme"], r["bits"]) == (layer, "asymmetric", bits))
            assert value == row["sqnr_db"]
        assert values[0] > values[1], "8 bits are quieter than 4"


@pytest.mark.slow
def test_every_figure_is_a_valid_png_linked_from_both_reports(finished_run):
    folder = finished_run / "report"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 7
    markdown, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 200
        assert f"]({png.name})" in markdown and f"src='{png.name}'" in page


@pytest.mark.slow
def test_report_command_regenerates_the_same_report_without_any_model(finished_run, tmp_path, run_cli):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    before = (copy / "report" / "report.md").read_text()
    shutil.rmtree(copy / "report")
    for weights in copy.rglob("*.safetensors"):  # fp32 weights, packed models, logits: none may be needed
        weights.unlink()
    result = run_cli("report", str(copy))
    assert result.returncode == 0, result.stderr
    assert (copy / "report" / "report.md").read_text() == before
    assert "7 figures" in result.stdout


@pytest.mark.slow
def test_report_on_a_folder_without_results_is_one_line(tmp_path, run_cli):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"bitsweep: error: {tmp_path}: no results.json; point at a sweep's run directory (runs/<sweep>) "
        "after `bitsweep run` has written it"]


def test_the_headline_names_the_recipe_and_data_that_reached_the_fewest_bits():
    def row(model, scheme, bits, top1, recipe="none", calibration="", policy="full"):
        return {"model": model, "scheme": scheme, "bits": bits, "top1": top1, "recipe": recipe, "status": "ok",
                "calibration": calibration, "policy": policy, "granularity": "channel", "kernel": "weight-only"}

    rows = [row("a", "fp32", 32, 90.0, recipe=""), row("a", "asymmetric", 5, 89.5), row("a", "asymmetric", 4, 85.0),
            row("a", "asymmetric", 4, 89.1, "bias", "synthetic"), row("a", "pow2", 3, 88.9, "bias", "synthetic"),
            row("b", "fp32", 32, 50.0, recipe=""), row("b", "symmetric", 3, 49.5),
            row("b", "symmetric", 3, 49.9, "gptq", "photos train 64"),
            row("c", "fp32", 32, 70.0, recipe=""), row("c", "pow2", 8, 60.0)]
    assert summary_table(rows).rows == [
        ["a", "90.00", "4", "asymmetric bias", "bias", "synthetic", "5"],  # pow2 3-bit lost 1.1 points
        ["b", "50.00", "3", "symmetric gptq", "gptq", "photos train 64", "3"],  # the better of two at 3 bits
        ["c", "70.00", "—", "none; closest: pow2 8b at 60.00", "none (plain rounding)", "—", "—"]]


def test_recovered_grouping_is_shown_next_to_the_natural_one():
    clusters = {"class_names": ["tee", "trouser", "pullover", "sandal", "sneaker"],
                "confusion": {"groups": [0, 1, 0, 2, 2], "k": 3},
                "weights": {"groups": [0, 1, 0, 0, 2], "k": 3},
                "natural": {"names": ["tops", "trouser", "footwear"], "groups": [0, 1, 0, 2, 2]}}
    table = grouping_table(clusters)
    assert table.headers == ["super-class", "by confusion", "by weights", "natural"]
    assert table.rows == [["1", "tee, pullover", "tee, pullover, sandal", "tops: tee, pullover"],
                          ["2", "trouser", "trouser", "trouser: trouser"],
                          ["3", "sandal, sneaker", "sneaker", "footwear: sandal, sneaker"]]
    assert same_partition(clusters["confusion"]["groups"], clusters["natural"]["groups"])
    assert same_partition([1, 0, 1, 2, 2], [0, 1, 0, 2, 2])
    assert not same_partition(clusters["weights"]["groups"], clusters["natural"]["groups"])


@pytest.mark.slow
def test_superclass_table_shows_class_and_superclass_accuracy(finished_run):
    rows = load_run(finished_run)["rows"]
    table = superclass_table(rows, "test_efficientnet")
    assert table.headers[:4] == ["precision", "scheme", "top-1 %", "super-class top-1 %"]
    assert len(table.rows) == 5
    for row in rows:
        assert row["super_top1"] >= row["top1"]  # merging classes can only forgive mistakes
        assert 0 <= row["super_agreement"] <= 100 and row["super_k"] >= 1
    clusters = json.loads(next((finished_run / "models").glob("*/clusters.json")).read_text())
    assert clusters["source"] == "confusion" and clusters["confusion"]["k"] == rows[0]["super_k"]


@pytest.mark.slow
def test_layer_sensitivity_is_the_accuracy_with_only_that_layer_quantized(finished_run):
    import timm
    from safetensors.torch import load_file

    import bitsweep
    from bitsweep.registry import get_registry

    run = load_run(finished_run)
    found = run["sensitivity"]["test_efficientnet"]
    record = json.loads(next((finished_run / "models").glob("*/record.json")).read_text())
    model = timm.create_model(record["arch"], **record["arch_kwargs"]).eval()
    model.load_state_dict(load_file(f"{record['dir']}/fp32.safetensors"))
    data = get_registry().get("dataset", "synthetic").load("test", {"n": 256, "num_classes": 4, "size": 16})
    images, labels = data.images[:64], data.labels[:64]
    layers = [r["layer"] for r in found["rows"] if (r["scheme"], r["bits"]) == ("asymmetric", 8)]
    assert len(layers) == 18 and {r["bits"] for r in found["rows"]} == {8, 4}
    for layer in (layers[0], layers[-1]):
        for bits in (8, 4):
            quantized = bitsweep.quantize_model(model, "asymmetric", bits, policy={"include": [layer]})
            with torch.inference_mode():
                top1 = 100 * (quantized(images).argmax(1) == labels).float().mean().item()
            row = next(r for r in found["rows"] if (r["layer"], r["bits"]) == (layer, bits))
            assert row["top1"] == pytest.approx(top1) and row["drop"] == pytest.approx(found["fp32"] - top1)
    drops = figures.layer_drop_data(found, "asymmetric")
    assert drops["layers"] == layers and drops["bits"] == [8, 4]
    assert drops["values"][0] == [next(r["drop"] for r in found["rows"] if (r["layer"], r["bits"]) == (layers[0], b))
                                  for b in (8, 4)]


def test_a_dendrogram_whose_merges_are_all_at_one_height_draws_without_warnings(tmp_path):
    """Classes all equally far apart (as a tiny model's may be): nothing to zoom into, and no singular y-axis."""
    clusters = {"class_names": list("abcd"),
                "weights": {"linkage": [[0, 1, 1.0, 2], [2, 3, 1.0, 2], [4, 5, 1.0, 4]], "threshold": None, "k": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = figures.draw_dendrogram(clusters, "weights", "tiny", tmp_path / "dendrogram.png")
    assert Image.open(path).format == "PNG"
