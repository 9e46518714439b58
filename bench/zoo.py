"""Every timm family through quantize -> pack -> load, on both kernel paths (issue 19).

    taskset -c 1 .venv/bin/python bench/zoo.py             # every family; table in bench/zoo.md; exit 1 on a failure
    taskset -c 1 .venv/bin/python bench/zoo.py --select    # choose the models again (tests/zoo_models.py)
    taskset -c 1 .venv/bin/python bench/zoo.py edgenext    # only the families named

A family is the timm module that registers a model (``timm.models._registry._model_to_module``); its
smallest variant by parameter count (built on the meta device: no memory, no init) stands for it, at
the smallest of ``SIDES`` its forward accepts (through ``img_size`` when the constructor takes it),
else at its own input size. Random weights are made to behave like trained ones first
(``trained_like``): timm zero-initialises some heads and residual branch ends, which would make the
output zeros or the branch invisible, and BatchNorm statistics at init do not describe any input.

Each model is ``quantize_model(m, "asymmetric", 4)``, saved with ``save_packed`` and loaded back:

- ``weight-only`` passes when its output is within ``WEIGHT_ONLY_RTOL`` (relative L2) of the fake-quant
  model's: it computes the same math from the same weights, in float32. The packed Linear kernels add
  each row's zero point as ``z * sum(x)``, whose rounding on long rows is about ten times that of
  PyTorch's own matrix product (3e-6 against 2.5e-7 per layer at 3072 inputs); a deep model adds it up
  (gemma4_vit, 167M parameters: 1.4e-4), hence 5e-4 rather than 1e-4. tests/test_kernels.py bounds each
  layer's rounding against float64.
- ``int8`` (``load_packed(..., kernel="int8")``, compiled by inductor, activation ranges from a
  calibration batch of the same distribution) first has to compute the fake-quant model once its
  activations are unrounded: ``convert_int8`` checks that itself (``FOLLOW_RTOL``) and refuses a graph a
  torchao pattern got wrong. It then passes when its 8-bit activations move the output less than the
  4-bit weights did (relative L2 against the fake-quant model, against the fp32 model): the weights are
  exact on int8, so only the activations' rounding differs. Random weights make some deep families so
  sensitive that 4-bit weights alone leave the output unrelated to fp32's (hardcorenas: 21x its norm),
  so a fixed cosine threshold would judge the network, not the int8 path. ``refused`` when it raises
  ``BitsweepError`` with a one-line message; anything else fails. The cosine is printed beside.

Each family runs in its own process (a crash or a hang is that family's failure, not the bench's).
"""

from __future__ import annotations

import argparse
import collections
import json
import runpy
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from bitsweep.evaluate import relative_error
from machine import cpu_summary

ROOT = Path(__file__).resolve().parent.parent
MODELS_FILE = ROOT / "tests" / "zoo_models.py"
TABLE_FILE = ROOT / "bench" / "zoo.md"
SIDES = (32, 56, 64, 96, 128)  # input sides tried, smallest first (56: patch-14 ViTs)
BATCH, CALIBRATION = 2, 8  # images compared, and images setting the int8 activation ranges
WEIGHT_ONLY_RTOL = 5e-4
TIMEOUT = 900  # seconds per family


def families() -> dict[str, list[str]]:
    """timm's models grouped by the module that registers them."""
    import timm
    from timm.models._registry import _model_to_module

    grouped = collections.defaultdict(list)
    for name in timm.list_models():
        grouped[_model_to_module[name]].append(name)
    return dict(sorted(grouped.items()))


def count_parameters(name: str) -> int | None:
    """Parameters of ``name`` built on the meta device, or None when timm cannot build it there."""
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def build(name: str, kwargs: dict, device: str = "cpu") -> nn.Module:
    import timm

    torch.manual_seed(0)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs).eval()


def fit_input(name: str) -> tuple[dict, tuple[int, ...]]:
    """The smallest input the model runs on: ``img_size`` kwargs (when taken) and the input shape.
    Tried on the meta device (shapes only, no memory); the model's own size when no small one runs."""
    from bitsweep.synthetic import input_size

    for side in SIDES:
        for kwargs in ({}, {"img_size": side}):
            try:
                model = build(name, kwargs, "meta")
                shape = (model.pretrained_cfg.get("input_size", input_size(model))[0], side, side)
                with torch.no_grad():
                    model(torch.zeros((BATCH, *shape), device="meta"))
                return kwargs, shape
            except Exception:
                continue
    model = build(name, {}, "meta")
    return {}, tuple(model.pretrained_cfg.get("input_size", input_size(model)))


def select() -> list[dict]:
    """Per family, the smallest variant and the smallest input it runs on."""
    chosen = []
    for family, names in families().items():
        counted = sorted((n, c) for n, c in ((n, count_parameters(n)) for n in names) if c is not None)
        if not counted:
            chosen.append({"family": family, "model": names[0], "kwargs": {}, "input": None, "params": None})
            continue
        model, params = min(counted, key=lambda item: item[1])
        try:
            kwargs, shape = fit_input(model)
        except Exception:  # judged (and reported) when the family runs
            kwargs, shape = {}, None
        chosen.append({"family": family, "model": model, "kwargs": kwargs, "input": shape, "params": params})
        print(f"{family}: {model} {params} {kwargs} {shape}", flush=True)
    return chosen


def trained_like(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    """Make random weights behave like trained ones, in place.

    Weights and scales timm initialises to (near) zero -- classifier heads, the last norm or layer
    scale of residual branches -- get values like a trained layer's (normal with 1/sqrt(fan-in) for
    matrices, 0.5..1 for vectors); then every BatchNorm's running statistics are re-estimated on seeded
    standard-normal batches (train mode, cumulative average), so each normalises what it really sees.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias") or p.numel() == 0 or p.abs().max() > 1e-4:
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=generator) * 0.5 + 0.5)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and m.track_running_stats]
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for _ in range(4):
            model(torch.randn((4, *shape), generator=generator))
    model.eval()


def inputs(shape: tuple[int, ...], count: int, seed: int) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.reshape(len(a), -1), b.reshape(len(b), -1), dim=1)


def int8_follows(output: torch.Tensor, reference: torch.Tensor, fp32: torch.Tensor) -> bool:
    """The int8 model's 8-bit activations moved the fake-quant model's output less than its 4-bit weights
    moved fp32's."""
    return relative_error(output, reference) <= relative_error(reference, fp32)


def run_one(entry: dict, int8: str | None = "compiled") -> dict:
    """One family through both paths; the row of the table. ``int8``: ``compiled`` (the packed file on
    the int8 kernels), ``graph`` (``convert_int8``'s graph: what the kernels compute, without inductor's
    compilation, which takes most of the time) or None."""
    import bitsweep
    from bitsweep.errors import BitsweepError
    from bitsweep.int8 import convert_int8

    start = time.perf_counter()
    name, kwargs, shape = entry["model"], entry["kwargs"], tuple(entry["input"])
    model = build(name, kwargs)
    trained_like(model, shape)
    fake = bitsweep.quantize_model(model, "asymmetric", 4)
    x = inputs(shape, BATCH, seed=1)
    with torch.no_grad():
        reference, fp32 = fake(x), model(x)
    row = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        bitsweep.save_packed(fake, path, arch=name, arch_kwargs=kwargs)
        try:
            with torch.no_grad():
                output = bitsweep.load_packed(path)(x)
            row["rel_error"] = relative_error(output, reference)
            row["weight_only"] = "pass" if row["rel_error"] <= WEIGHT_ONLY_RTOL else "fail"
        except Exception as exc:
            row |= {"weight_only": "fail", "error": f"weight-only: {type(exc).__name__}: {exc}"}
        if int8:
            calibration = [inputs(shape, CALIBRATION, 2)]
            try:
                if int8 == "graph":
                    with torch.no_grad():
                        output = convert_int8(fake, fake.quantized_layers, calibration)(x)
                else:
                    compiled = bitsweep.load_packed(path, kernel="int8", calibration=calibration)
                    output = torch.cat([compiled(row_x[None]) for row_x in x])  # batch 1: the shape compiled
                row["cosine"] = cosines(output, reference).min().item()
                row["top1"] = (output.argmax(-1) == reference.argmax(-1)).float().mean().item()
                row["activation_error"] = relative_error(output, reference)
                row["weight_error"] = relative_error(reference, fp32)
                row["int8"] = "pass" if int8_follows(output, reference, fp32) else "fail"
            except BitsweepError as exc:
                one_line = "\n" not in str(exc).strip()
                row |= {"int8": "refused" if one_line else "fail", "error": f"int8: {exc}"}
            except Exception as exc:
                row |= {"int8": "fail", "error": f"int8: {type(exc).__name__}: {str(exc)[:300]}"}
    row["seconds"] = time.perf_counter() - start
    return row


def run_isolated(entry: dict, int8: str | None) -> dict:
    """``run_one`` in a fresh interpreter: a crash, a hang or an unexpected exception fails the family."""
    command = [sys.executable, __file__, "--one", json.dumps(entry), "--int8", str(int8)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"weight_only": "fail", "int8": "fail", "error": f"timed out after {TIMEOUT} s",
                "seconds": time.perf_counter() - start}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"weight_only": "fail", "int8": "fail", "error": tail[:300], "seconds": time.perf_counter() - start}


def write_models(chosen: list[dict]) -> None:
    lines = ['"""The smallest variant of every timm family, and the smallest input it runs on: chosen by',
             'bench/zoo.py --select (do not edit by hand; rerun it after a timm upgrade)."""', "", "MODELS = ["]
    lines += [f"    {entry!r}," for entry in chosen]
    MODELS_FILE.write_text("\n".join([*lines, "]", ""]))


def read_models() -> list[dict]:
    return runpy.run_path(str(MODELS_FILE))["MODELS"]


def table(rows: list[dict]) -> str:
    lines = ["| family | model | params | input | weight-only | int8 | cosine | int8 error | 4-bit error | seconds |",
             "|---|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        size = "x".join(map(str, r["input"][1:])) if r.get("input") else "?"
        cosine, errors = (f"{r['cosine']:.3f}", f"{r['activation_error']:.3f} | {r['weight_error']:.3f}") \
            if r.get("cosine") is not None else ("", " | ")
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "?"
        int8 = r.get("int8", "")
        if r.get("error"):
            int8 += f" ({r['error'][:120]})".replace("|", "/")
        lines.append(f"| {r['family']} | {r['model']} | {params} | {size} | {r['weight_only']} | {int8} | "
                     f"{cosine} | {errors} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="only these families (default: every one)")
    parser.add_argument("--select", action="store_true", help=f"choose the models again into {MODELS_FILE.name}")
    parser.add_argument("--int8", choices=["compiled", "graph", "None"], default="compiled",
                        help="int8 path: compiled by inductor (default), its uncompiled graph, or None (skip)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    int8 = None if args.int8 == "None" else args.int8
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), int8)))
        return 0
    run = f"`bench/zoo.py --int8 {args.int8}`, {time.strftime('%Y-%m-%d')}, {cpu_summary()}"
    print(run, flush=True)
    if args.select or not MODELS_FILE.exists():
        write_models(select())
    chosen = [e for e in read_models() if not args.families or e["family"] in args.families]
    chosen.sort(key=lambda e: e["params"] or 0)  # smallest first: the big ones take most of the time
    rows = []
    for entry in chosen:
        if entry["input"] is None:
            result = {"weight_only": "fail", "int8": "fail", "seconds": 0.0,
                      "error": "timm cannot build it on the meta device or run it at any input size tried"}
        else:
            result = run_isolated(entry, int8)
        rows.append(entry | result)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    works = sum(r.get("int8") == "pass" for r in rows)
    summary = (f"{len(rows)} families: weight-only passes {sum(r['weight_only'] == 'pass' for r in rows)}; "
               f"int8 passes {works}, refuses {sum(r.get('int8') == 'refused' for r in rows)}, "
               f"fails {sum(r.get('int8') == 'fail' for r in rows)}; int8 runs correctly on "
               f"{100 * works / max(len(rows), 1):.0f} % of the families")
    print(text, summary, sep="\n")
    if not args.families:
        TABLE_FILE.write_text(f"# bench/zoo.py\n\n{run}\n\n{summary}\n\n{text}\n")
    failed = any(r["weight_only"] != "pass" or r.get("int8") == "fail" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
