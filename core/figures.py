"""The report's figures: each is data first (a plain function of stored results, tested as data),
then drawn to a PNG with matplotlib's object API (no pyplot state, safe in worker threads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bitsweep.cells import variant_words
from bitsweep.files import atomic_path
from bitsweep.profile import WHOLE_MODEL

DPI = 110


def metric_of(rows: list[dict]) -> str:
    """top1 on labelled data, else agreement with fp32 (the only accuracy label-free data gives)."""
    return "top1" if any(r.get("top1") is not None for r in rows) else "agreement"


def series_label(row: dict) -> str:
    """A cell's line name: its scheme, plus whatever else distinguishes it in this sweep."""
    return " ".join([row["scheme"], *variant_words(row.get("granularity"), row.get("group_size"), row.get("policy"),
                                                   row.get("recipe"), row.get("kernel"))])


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    models: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("status") == "ok":
            models.setdefault(row["model"], []).append(row)
    return models


def bit_limit_data(rows: list[dict]) -> dict:
    """Per model: the fp32 level and, per scheme line, (bits, accuracy) sorted by bits."""
    data = {}
    for model, mine in _by_model(rows).items():
        metric = metric_of(mine)
        fp32 = next((r[metric] for r in mine if r["scheme"] == "fp32"), None)
        lines: dict[str, list] = {}
        for row in mine:
            if row["scheme"] != "fp32" and row.get(metric) is not None:
                lines.setdefault(series_label(row), []).append((row["bits"], row[metric]))
        data[model] = {"metric": metric, "fp32": fp32, "lines": {k: sorted(v) for k, v in lines.items()}}
    return data


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both size (smaller) and accuracy (higher), by size."""
    front, best = [], -np.inf
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def pareto_data(rows: list[dict]) -> dict:
    """Per model: every cell as (MB stored, accuracy, label), and the Pareto front among them."""
    data = {}
    for model, mine in _by_model(rows).items():
        metric = metric_of(mine)
        points = [(r["bytes_stored"] / 1e6, r[metric], f"{series_label(r)} {r['bits']}b" if r["scheme"] != "fp32"
                   else "fp32") for r in mine if r.get(metric) is not None and r.get("bytes_stored")]
        data[model] = {"metric": metric, "points": points, "front": pareto_front(points)}
    return data


def chosen_layers(profile: list[dict], model: str) -> list[str]:
    """First, middle and last Conv/Linear layer of a model: where the paper looks."""
    layers = [r["layer"] for r in profile
              if r["model"] == model and r["scheme"] == "fp32" and r["layer"] != WHOLE_MODEL]
    return list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]])) if layers else []


def box_data(profile: list[dict], model: str, bits: int, layers: list[str]) -> dict:
    """Per layer: quartile boxes (fp32, then each scheme at ``bits``, every layer quantized)."""
    boxes = {}
    for layer in layers:
        found = [r for r in profile if r["model"] == model and r["layer"] == layer
                 and (r["scheme"] == "fp32" or (r["bits"] == bits and r.get("policy") in ("full", "")))]
        found.sort(key=lambda r: r["scheme"] != "fp32")
        boxes[layer] = [("fp32" if r["scheme"] == "fp32" else series_label(r), r) for r in found]
    return {"bits": bits, "layers": boxes}


def weight_sqnr_data(profile: list[dict], model: str, scheme: str) -> dict:
    """Layer × bits → SQNR (dB) of ``scheme`` with every layer quantized; None where not quantized."""
    rows = [r for r in profile if r["model"] == model and r["scheme"] == scheme and r.get("policy") == "full"
            and r["layer"] != WHOLE_MODEL]
    granularity = rows[0]["granularity"] if rows else None
    rows = [r for r in rows if r["granularity"] == granularity]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    cell = {(r["layer"], r["bits"]): r["sqnr_db"] for r in rows}
    return {"layers": layers, "bits": bits, "values": [[cell.get((layer, b)) for b in bits] for layer in layers]}


def layer_drop_data(sensitivity: dict, scheme: str) -> dict:
    """Layer × bits → accuracy drop (points) when only that layer is quantized with ``scheme``."""
    rows = [r for r in sensitivity["rows"] if r["scheme"] == scheme]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    cell = {(r["layer"], r["bits"]): r["drop"] for r in rows}
    return {"layers": layers, "bits": bits, "values": [[cell.get((layer, b)) for b in bits] for layer in layers]}


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def _grid(count: int, width: float = 5.0, height: float = 3.6, columns: int = 3):
    columns = min(columns, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes


def draw_bit_limit(data: dict, path: Path) -> Path:
    figure, axes = _grid(len(data))
    for ax, (model, item) in zip(axes, data.items()):
        for label, points in item["lines"].items():
            ax.plot(*zip(*points), marker="o", label=label)
        if item["fp32"] is not None:
            ax.axhline(item["fp32"], color="black", linestyle="--", linewidth=1, label="fp32")
        ax.set(title=model, xlabel="bits per weight", ylabel=f"{item['metric']} %")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("Accuracy vs bits (the bit limit)")
    return _save(figure, path)


def draw_pareto(data: dict, path: Path) -> Path:
    figure, axes = _grid(len(data))
    for ax, (model, item) in zip(axes, data.items()):
        sizes, values, _ = zip(*item["points"])
        ax.scatter(sizes, values, s=14, alpha=0.6, label="cells")
        fx, fy, flabels = zip(*item["front"])
        ax.step(fx, fy, where="post", color="tab:red", label="Pareto front")
        for x, y, label in _spread(item["front"]):
            ax.annotate(label, (x, y), fontsize=6, xytext=(4, -8), textcoords="offset points")
        ax.set(title=model, xlabel="packed file MB", ylabel=f"{item['metric']} %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("Size vs accuracy")
    return _save(figure, path)


def _spread(front: list[tuple], most: int = 8) -> list[tuple]:
    """At most ``most`` front points, evenly spaced along it, so their labels stay readable."""
    if len(front) <= most:
        return front
    return [front[i] for i in sorted(set(np.linspace(0, len(front) - 1, most).round().astype(int).tolist()))]


def draw_boxes(data: dict, model: str, path: Path) -> Path:
    figure, axes = _grid(len(data["layers"]), width=4.5)
    for ax, (layer, boxes) in zip(axes, data["layers"].items()):
        stats = [{"label": label, "med": r["median"], "q1": r["q1"], "q3": r["q3"], "whislo": r["whislo"],
                  "whishi": r["whishi"], "mean": r["mean"], "fliers": []} for label, r in boxes]
        ax.bxp(stats, showmeans=True, showfliers=False)
        ax.set_title(layer, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    figure.suptitle(f"{model}: weight quartiles, fp32 vs {data['bits']}-bit schemes (whiskers: 1.5 IQR)")
    return _save(figure, path)


def draw_heatmaps(panels: dict[str, dict], title: str, label: str, path: Path, cmap: str = "viridis") -> Path:
    """One layer × bits heatmap per panel (scheme), on one colour scale."""
    matrices = {name: np.array([[np.nan if v is None else v for v in row] for row in item["values"]], dtype=float)
                for name, item in panels.items()}
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices.values()] + [np.zeros(0)])
    low, high = (finite.min(), finite.max()) if finite.size else (0, 1)
    first = next(iter(panels.values()))
    figure = Figure(figsize=(2.2 + 2.2 * len(panels), max(3.0, 0.15 * len(first["layers"]) + 1.5)),
                    layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True).ravel()
    for ax, (name, item) in zip(axes, panels.items()):
        image = ax.imshow(matrices[name], aspect="auto", cmap=cmap, vmin=low, vmax=high)
        ax.set_xticks(range(len(item["bits"])), [str(b) for b in item["bits"]])
        ax.set(title=name, xlabel="bits")
    axes[0].set_yticks(range(len(first["layers"])), first["layers"], fontsize=5 if len(first["layers"]) > 30 else 7)
    figure.colorbar(image, ax=list(axes), label=label)
    figure.suptitle(title)
    return _save(figure, path)


def draw_dendrogram(clusters: dict, view: str, model: str, path: Path) -> Path:
    from scipy.cluster.hierarchy import dendrogram

    item = clusters[view]
    names = clusters["class_names"]
    figure = Figure(figsize=(min(14, 2 + 0.5 * len(names)) if len(names) <= 40 else 12, 4), layout="constrained")
    ax = figure.subplots()
    options = {"labels": names} if len(names) <= 40 else {"truncate_mode": "lastp", "p": 40, "no_labels": True}
    dendrogram(np.array(item["linkage"]), ax=ax, color_threshold=item["threshold"] or 0, **options)
    if item["threshold"] is not None:
        ax.axhline(item["threshold"], color="black", linestyle="--", linewidth=1)
    heights = np.array(item["linkage"])[-(min(len(names), 40) - 1):, 2]  # the merges drawn
    spread = np.ptp(heights)
    if spread > 0 and heights.min() > 0.5 * heights.max():  # all near the top (e.g. 1000 nearly orthogonal classes)
        ax.set_ylim(heights.min() - 0.1 * spread, heights.max() + 0.05 * spread)  # zoom in
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax.set(title=f"{model}: classes clustered by {view} (cut into {item['k']} super-classes)", ylabel="distance")
    return _save(figure, path)
