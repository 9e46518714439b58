"""The report step: the paper's tables and figures from a finished run's stored results.

Reads only what the sweep wrote (results.json, profile.json, each model's clusters.json) and
writes ``report/`` in the run directory: PNG figures, ``report.md`` and ``report.html``. It never
builds or loads a model, so ``bitsweep report RUN_DIR`` takes seconds.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitsweep import figures
from bitsweep.cluster import cut
from bitsweep.errors import BitsweepError
from bitsweep.files import atomic_path
from bitsweep.profile import WHOLE_MODEL


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path
    caption: str


def _fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _mb(value) -> str:
    return "—" if not value else f"{value / 1e6:.3f}"


def _precision(row: dict) -> str:
    return "fp32" if row["scheme"] == "fp32" else f"{row['bits']}-bit"


def load_run(run_dir: Path) -> dict:
    """What a report needs from a run directory, checked, as plain data."""
    run_dir = Path(run_dir)
    results = run_dir / "results.json"
    if not results.is_file():
        raise BitsweepError(f"{run_dir}: no results.json; point at a sweep's run directory (runs/<sweep>) "
                            "after `bitsweep run` has written it")
    try:
        rows = json.loads(results.read_text())
        profile_path = run_dir / "profile.json"
        profile = json.loads(profile_path.read_text()) if profile_path.exists() else []
        clusters, sensitivity = {}, {}
        for found, name in ((clusters, "clusters.json"), (sensitivity, "sensitivity.json")):
            for path in sorted(run_dir.glob(f"models/*/{name}")):
                record = json.loads((path.parent / "record.json").read_text())
                found[record["model"]] = json.loads(path.read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise BitsweepError(f"{run_dir}: unreadable results ({exc}); rerun `bitsweep run` to rewrite them") from None
    sweep = rows[0]["sweep"] if rows else run_dir.name
    return {"sweep": sweep, "rows": rows, "profile": profile, "clusters": clusters, "sensitivity": sensitivity}


def summary_table(rows: list[dict]) -> Table:
    """Per model: fp32 accuracy, the fewest bits that stay within 1 point of it, the cell that reached them
    (its recipe, and the data its data-free steps read), and the fewest with plain rounding alone: what recipes
    buy. A model no cell keeps within 1 point shows its closest cell instead."""
    table = Table(["model", "fp32 top-1 / agreement", "fewest bits within 1 point of fp32", "reached by", "recipe",
                   "data read", "with plain rounding"], [])
    ok = [r for r in rows if r["status"] == "ok" and r["scheme"] != "fp32"]
    for base in (r for r in rows if r["scheme"] == "fp32" and r["status"] == "ok"):
        metric = "top1" if base.get("top1") is not None else "agreement"
        mine = [r for r in ok if r["model"] == base["model"] and r.get(metric) is not None]
        good = [r for r in mine if base[metric] - r[metric] <= 1.0]
        fewest = lambda cells: min(cells, key=lambda r: (r["bits"], -r[metric]), default=None)  # noqa: E731
        best, plain = fewest(good), fewest([r for r in good if r.get("recipe", "none") == "none"])
        closest = max(mine, key=lambda r: (r[metric], -r["bits"]), default=None)
        shown = best or closest
        if shown is None:
            table.rows.append([base["model"], _fmt(base[metric]), "—", "—", "—", "—", "—"])
            continue
        recipe = shown.get("recipe", "none")
        reached = figures.series_label(shown) if best else \
            f"none; closest: {figures.series_label(shown)} {shown['bits']}b at {_fmt(shown[metric])}"
        table.rows.append([base["model"], _fmt(base[metric]), str(best["bits"]) if best else "—", reached,
                           "none (plain rounding)" if recipe == "none" else recipe, shown.get("calibration") or "—",
                           str(plain["bits"]) if plain else "—"])
    return table


def accuracy_size_table(rows: list[dict], model: str) -> Table:
    """The paper's first table: Acc, Size MB, −ΔAcc and ΔSize at each precision."""
    mine = [r for r in rows if r["model"] == model and r["status"] == "ok"]
    metric = figures.metric_of(mine)
    table = Table(["precision", "scheme", "Acc %" if metric == "top1" else "agreement %", "Size MB", "−ΔAcc %",
                   "ΔSize %"], [])
    for r in sorted(mine, key=lambda r: (-r["bits"], figures.series_label(r))):
        table.rows.append([_precision(r), "" if r["scheme"] == "fp32" else figures.series_label(r), _fmt(r[metric]),
                           _mb(r.get("bytes_stored")), _fmt(r.get("delta_acc_pct")),
                           _fmt(r.get("delta_size_pct"), ".1f")])
    return table


def compression_table(rows: list[dict], model: str) -> Table | None:
    """The paper's third table: each compressor's size of the packed file and the Δ between them."""
    mine = [r for r in rows  # kernel paths share one packed file: count it once
            if r["model"] == model and r["status"] == "ok" and r.get("kernel") in ("weight-only", "fp32")]
    names = [n for n in ("gzip", "7z", "zstd") if any(r.get(f"bytes_{n}") for r in mine)]
    if not names:
        return None
    headers = ["precision", "scheme", "packed MB", *(f"{n} MB" for n in names)]
    others = [n for n in names if n != "gzip"] if "gzip" in names else []
    headers += [f"Δ {n} vs gzip %" for n in others] + ["entropy MB"]
    table = Table(headers, [])
    for r in sorted(mine, key=lambda r: (-r["bits"], figures.series_label(r))):
        cells = [_precision(r), "" if r["scheme"] == "fp32" else figures.series_label(r), _mb(r.get("bytes_stored"))]
        cells += [_mb(r.get(f"bytes_{n}")) for n in names]
        cells += [_fmt(100 * (1 - r[f"bytes_{n}"] / r["bytes_gzip"]), ".1f")
                  if r.get(f"bytes_{n}") and r.get("bytes_gzip") else "—" for n in others]
        cells.append(_mb(r.get("entropy_bytes")))
        table.rows.append(cells)
    return table


def distribution_table(profile: list[dict], model: str) -> Table:
    """Whole-model weight statistics per precision: how each scheme reshapes the distribution."""
    table = Table(["precision", "scheme", "min", "max", "IQR", "outliers %", "kurtosis", "zeros %", "SQNR dB"], [])
    mine = [r for r in profile if r["model"] == model and r["layer"] == WHOLE_MODEL]
    for r in sorted(mine, key=lambda r: (-r["bits"], figures.series_label(r))):
        table.rows.append([_precision(r), "" if r["scheme"] == "fp32" else figures.series_label(r),
                           _fmt(r["min"], ".4g"), _fmt(r["max"], ".4g"), _fmt(r["iqr"], ".4g"),
                           _fmt(100 * r["outlier_fraction"]), _fmt(r["kurtosis"], ".2f"),
                           _fmt(100 * r["zero_fraction"]), _fmt(r["sqnr_db"], ".1f")])
    return table


def same_partition(a: list[int], b: list[int]) -> bool:
    """Whether two groupings put the same classes together (group numbers aside)."""
    return len(a) == len(b) and len(set(zip(a, b))) == len(set(a)) == len(set(b))


def grouping_table(clusters: dict, max_members: int = 12) -> Table:
    """Recovered super-classes (each view) next to the dataset's natural ones."""
    names = clusters["class_names"]
    views = [v for v in ("confusion", "weights") if v in clusters]
    if clusters.get("natural"):
        views.append("natural")
    columns = {}
    for view in views:
        groups = clusters[view]["groups"]
        members = {}
        for cls, group in enumerate(groups):
            members.setdefault(group, []).append(names[cls])
        listed = []
        for group in sorted(members):
            shown = members[group][:max_members]
            more = f" … (+{len(members[group]) - max_members})" if len(members[group]) > max_members else ""
            title = clusters["natural"]["names"][group] + ": " if view == "natural" else ""
            listed.append(title + ", ".join(shown) + more)
        columns[view] = listed
    depth = max(len(c) for c in columns.values())
    table = Table(["super-class", *(f"by {v}" if v != "natural" else "natural" for v in views)], [])
    for i in range(depth):
        table.rows.append([str(i + 1), *(c[i] if i < len(c) else "" for c in columns.values())])
    return table


def superclass_table(rows: list[dict], model: str) -> Table:
    """Class vs super-class accuracy at every precision: the paper's clustering claim, measured."""
    mine = [r for r in rows if r["model"] == model and r["status"] == "ok"]
    labelled = any(r.get("top1") is not None for r in mine)
    natural = any(r.get("super_top1_natural") is not None for r in mine)
    headers = ["precision", "scheme"] + (["top-1 %", "super-class top-1 %"] if labelled else [])
    headers += ["natural super-class top-1 %"] if natural else []
    headers += ["agreement %", "super-class agreement %"]
    table = Table(headers, [])
    for r in sorted(mine, key=lambda r: (-r["bits"], figures.series_label(r))):
        cells = [_precision(r), "" if r["scheme"] == "fp32" else figures.series_label(r)]
        cells += [_fmt(r.get("top1")), _fmt(r.get("super_top1"))] if labelled else []
        cells += [_fmt(r.get("super_top1_natural"))] if natural else []
        cells += [_fmt(r.get("agreement")), _fmt(r.get("super_agreement"))]
        table.rows.append(cells)
    return table


def build(run: dict, folder: Path) -> list:
    """The report as blocks (headings, text, tables, images), drawing its figures into ``folder``."""
    rows, profile, clusters = run["rows"], run["profile"], run["clusters"]
    ok = [r for r in rows if r["status"] == "ok" and r["scheme"] != "fp32"]
    failed = [r for r in rows if r["status"] != "ok"]
    blocks = [Heading(f"bitsweep report: sweep `{run['sweep']}`", 1),
              Text(f"{len(ok)} cells finished, {len(failed)} failed."), summary_table(rows)]
    for r in failed:
        blocks.append(Text(f"Failed: {r['model']} {figures.series_label(r)} {r.get('bits')}b: {r.get('error')}"))
    models = list(dict.fromkeys(r["model"] for r in rows if r["status"] == "ok"))
    if ok:
        blocks += [Heading("Accuracy vs bits"),
                   Image(figures.draw_bit_limit(figures.bit_limit_data(rows), folder / "bit_limit.png"),
                         "Accuracy at each width, one line per scheme; dashed: fp32."),
                   Image(figures.draw_pareto(figures.pareto_data(rows), folder / "pareto.png"),
                         "Packed size vs accuracy for every cell, with the Pareto front.")]
    for model in models:
        blocks += [Heading(model), Heading("Accuracy and size per precision", 3), accuracy_size_table(rows, model)]
        compression = compression_table(rows, model)
        if compression:
            blocks += [Heading("Compression of the packed files", 3), compression]
        mine_profile = [r for r in profile if r["model"] == model]
        if mine_profile:
            blocks += [Heading("Weight distributions", 3), distribution_table(profile, model)]
            widths = sorted({r["bits"] for r in mine_profile if r["scheme"] != "fp32"})
            if widths:
                bits = 4 if 4 in widths else widths[0]
                data = figures.box_data(profile, model, bits, figures.chosen_layers(profile, model))
                blocks.append(Image(figures.draw_boxes(data, model, folder / f"{model}-boxes.png"),
                                    f"Quartiles of chosen layers' weights, fp32 and {bits}-bit schemes."))
                schemes = list(dict.fromkeys(r["scheme"] for r in mine_profile if r["scheme"] != "fp32"))
                panels = {s: figures.weight_sqnr_data(profile, model, s) for s in schemes}
                panels = {s: p for s, p in panels.items() if p["layers"]}
                if panels:
                    path = folder / f"{model}-weight-sqnr.png"
                    title = f"{model}: per-layer weight SQNR"
                    blocks.append(Image(figures.draw_heatmaps(panels, title, "SQNR dB", path),
                                        "SQNR of each layer's quantized weights at each width (higher is safer)."))
        if model in run["sensitivity"]:
            measured = run["sensitivity"][model]
            schemes = list(dict.fromkeys(r["scheme"] for r in measured["rows"]))
            panels = {s: figures.layer_drop_data(measured, s) for s in schemes}
            path = folder / f"{model}-layer-drop.png"
            title = f"{model}: {measured['metric']} drop when only one layer is quantized"
            blocks += [Heading("Layer sensitivity", 3),
                       Image(figures.draw_heatmaps(panels, title, "points lost", path, cmap="magma_r"),
                             f"Points of {measured['metric']} lost (fp32: {measured['fp32']:.2f}) when only that "
                             f"layer is quantized, on the first {measured['settings']['images']} evaluation images.")]
        found = clusters.get(model, {})
        if "confusion" in found or "weights" in found:
            blocks += [Heading("Class clusters", 3), grouping_table(found)]
            if found.get("natural"):
                natural = found["natural"]["groups"]
                views = [v for v in ("confusion", "weights") if v in found]
                k = len(set(natural))
                verdict = lambda groups: "yes" if same_partition(groups, natural) else "no"  # noqa: E731
                chosen = ", ".join(f"by {v}: {verdict(found[v]['groups'])}" for v in views)
                at_k = ", ".join(f"by {v}: {verdict(cut(np.array(found[v]['linkage']), k))}" for v in views)
                blocks.append(Text(f"Recovered grouping equals the natural one: {chosen}; "
                                   f"cut into the natural {k} groups instead: {at_k}."))
            for view in ("confusion", "weights"):
                if view in found:
                    blocks.append(Image(figures.draw_dendrogram(found, view, model, folder / f"{model}-{view}.png"),
                                        f"Class hierarchy by {view}; dashed: the cut into {found[view]['k']} groups."))
            if found["source"]:
                blocks += [Text(f"Super-class scores below use the {found['source']} grouping "
                                f"({found[found['source']]['k']} super-classes)."), superclass_table(rows, model)]
    return blocks


def to_markdown(blocks: list, image_link=lambda image: image.path.name) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Table):
            out.append("\n".join(["| " + " | ".join(block.headers) + " |",
                                  "|" + "---|" * len(block.headers),
                                  *("| " + " | ".join(row) + " |" for row in block.rows)]))
        elif isinstance(block, Image):
            out.append(f"![{block.caption}]({image_link(block)})\n\n*{block.caption}*")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
           "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
           "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}</style></head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            out.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif isinstance(block, Image):
            out.append(f"<figure><img src='{html.escape(block.path.name)}' alt='{html.escape(block.caption)}'>"
                       f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    return "\n".join(out + ["</body></html>"])


def data_uri(image: Image) -> str:
    """A PNG inlined, for places that cannot reach the run directory (the Prefect UI)."""
    return "data:image/png;base64," + base64.b64encode(image.path.read_bytes()).decode()


def write_report(run_dir: Path) -> dict:
    """Draw the figures and write report.md and report.html into ``run_dir/report``."""
    run = load_run(run_dir)
    folder = Path(run_dir) / "report"
    blocks = build(run, folder)
    markdown, page = folder / "report.md", folder / "report.html"
    with atomic_path(markdown) as tmp:
        tmp.write_text(to_markdown(blocks))
    with atomic_path(page) as tmp:
        tmp.write_text(to_html(blocks, f"bitsweep report: {run['sweep']}"))
    return {"markdown": markdown, "html": page, "figures": [b.path for b in blocks if isinstance(b, Image)],
            "blocks": blocks}
