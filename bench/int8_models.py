"""Whole-model speed of the int8-compute path against fp32 eager, the weight-only path and pt2e, batch 1, one core.

    taskset -c 1 .venv/bin/python bench/int8_models.py              # speed table; exit 1 if a target is missed
    taskset -c 1 .venv/bin/python bench/int8_models.py --agreement  # top-1 agreement, real EfficientNet-Lite0
    taskset -c 1 .venv/bin/python bench/int8_models.py tf_efficientnet_lite0 --bits 8  # other codes (default 4)

Models have random weights (speed does not depend on them); each is fake-quantized (asymmetric 4-bit
per channel by default: exact on int8; at 8 bits the zero points are added apart, which costs time)
and converted with the same 4 noise images for activation ranges as the incumbent gets (``convert_s``:
export to converted graph; ``compile_s``: inductor at batch 1). All contenders run alternately so that
load from other processes hits them alike.

The incumbent is plain pt2e: torchao's ``X86InductorQuantizer`` with its own observers compiled by
inductor, on the fp32 model (``pt2e_s``: all of it). Targets: bitsweep's int8 module at least 0.9x the
incumbent's speed (it runs the same kernels, fed with our codes) and faster than fp32 eager. ``agree``
is the top-1 agreement of the int8 module with the fake-quant model over 8 other noise inputs and
``cosine`` the mean cosine similarity of their logits (random weights make top-1 fragile: cosine is the
steadier measure); ``pt2e_cosine`` is the incumbent's against fp32, for scale.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import timm
import torch
from machine import alternate, cpu_summary

import bitsweep
from bitsweep.compile import compile_packed
from bitsweep.int8 import convert_int8, to_int8

MODELS = ("resnet18", "mobilenetv3_large_100", "tf_efficientnet_lite0", "vit_tiny_patch16_224")
AGAINST_PT2E, AGAINST_FP32 = 0.9, 1.0  # least speed-ups: over the incumbent (within noise) and over fp32 eager
SCHEME, BITS = "asymmetric", 4


def pt2e_int8(model: torch.nn.Module, x: torch.Tensor):
    """``model`` quantized by pt2e + ``X86InductorQuantizer`` and compiled by inductor, or ``None``
    without torchao."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        return None
    import torch._inductor.config

    torch._inductor.config.freezing = True  # weights become constants: inductor packs them for oneDNN
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inductor's own deprecation notices, one per layer
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
        for seed in range(4):
            prepared(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
        compiled = torch.compile(convert_pt2e(prepared))
        compiled(x)
    return compiled


def measure(names, threads: int = 1, runs: int = 15, scheme: str = SCHEME, bits: int = BITS) -> list[dict]:
    """One row per model: median ms of each contender, speed-ups, conversion and compile seconds, agreement."""
    torch.set_num_threads(threads)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        fake = bitsweep.quantize_model(model, scheme, bits)
        noise = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
        start = time.perf_counter()
        int8 = to_int8(fake, fake.quantized_layers, noise)
        convert = time.perf_counter() - start
        weight_only = compile_packed(fake)
        x = torch.randn(1, 3, 224, 224)
        start = time.perf_counter()
        incumbent = pt2e_int8(model, x)
        incumbent_s = time.perf_counter() - start
        modules = {"fp32": model, "int8": int8, "weight-only": weight_only}
        if incumbent is not None:
            modules["pt2e"] = incumbent
        medians = alternate({key: lambda _, m=m: m(x) for key, m in modules.items()}, layers=1, repeats=runs)
        inputs = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference, output = fake(inputs), torch.cat([int8(row[None]) for row in inputs])
            pt2e_cosine = None if incumbent is None else torch.nn.functional.cosine_similarity(
                model(inputs), torch.cat([incumbent(row[None]) for row in inputs])).mean().item()
        speedup = medians["fp32"] / medians["int8"]
        versus = medians["pt2e"] / medians["int8"] if "pt2e" in medians else None
        rows.append({"model": name, "fp32_ms": medians["fp32"] * 1e3, "weight_only_ms": medians["weight-only"] * 1e3,
                     "pt2e_ms": medians["pt2e"] * 1e3 if versus else None, "int8_ms": medians["int8"] * 1e3,
                     "speedup": speedup, "vs_pt2e": versus,
                     "met": speedup > AGAINST_FP32 and (versus is None or versus >= AGAINST_PT2E),
                     "convert_s": convert - int8.compile_seconds, "compile_s": int8.compile_seconds,
                     "pt2e_s": incumbent_s if versus else None,
                     "agree": (reference.argmax(1) == output.argmax(1)).float().mean().item(),
                     "cosine": torch.nn.functional.cosine_similarity(reference, output).mean().item(),
                     "pt2e_cosine": pt2e_cosine,
                     "exact": f"{sum(int8.int8_exact.values())}/{len(fake.quantized_layers)}",
                     "fp32_layers": len(int8.fp32_layers)})
    return rows


def agreement(configs=(("asymmetric", 8), ("symmetric", 6), ("pow2", 4), ("asymmetric", 4)),
              modes=("photos", "synthetic", "noise")) -> list[dict]:
    """Top-1 agreement of the int8 graph with its fake-quant model on the offline photos (11 photos x 8
    views), for trained EfficientNet-Lite0, per calibration mode: ``photos`` = the 64 views of the photos
    dataset's calibration split (8 other photos), ``synthetic`` = data-free default, ``noise`` = 8 standard-normal inputs (the naive data-free
    baseline). It runs ``convert_int8``'s graph, which computes what the compiled kernels do
    (tests/test_int8.py checks that) without a compilation per row."""
    from bitsweep.plugins.efficientnet_lite import convert_state_dict, weights_path
    from bitsweep.plugins.imagefolder import preprocess
    from bitsweep.plugins.photos import Photos, load_photos, views_of

    torch.set_num_threads(1)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(state, model))
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    photos = load_photos()
    evaluation = preprocess([v for p in photos for v in views_of(p, 8)], config)
    calibration = Photos().load("train", {}, config).images.split(8)
    with torch.no_grad():
        reference = model(evaluation).argmax(1)
    rows = []
    for scheme, bits in configs:
        fake = bitsweep.quantize_model(model, scheme, bits)
        with torch.no_grad():
            fake_top1 = fake(evaluation).argmax(1)
        for mode in modes:
            batches = {"photos": list(calibration), "synthetic": None,
                       "noise": [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))]}[mode]
            start = time.perf_counter()
            graph = convert_int8(fake, fake.quantized_layers, batches)
            convert = time.perf_counter() - start
            with torch.no_grad():
                top1 = graph(evaluation).argmax(1)
            rows.append({"scheme": f"{scheme}-{bits}", "calibration": mode,
                         "agree_fake": (top1 == fake_top1).float().mean().item(),
                         "agree_fp32": (top1 == reference).float().mean().item(),
                         "fake_agree_fp32": (fake_top1 == reference).float().mean().item(),
                         "exact": f"{sum(graph.int8_exact.values())}/{len(fake.quantized_layers)}",
                         "convert_s": convert})
    return rows


def _print(rows: list[dict]) -> None:
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--agreement", action="store_true", help="top-1 agreement table instead of speed")
    parser.add_argument("--scheme", default=SCHEME, help=f"the codes the int8 path runs (default {SCHEME})")
    parser.add_argument("--bits", type=int, default=BITS, help=f"their width (default {BITS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_summary(), flush=True)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    if args.agreement:
        _print(agreement())
        return 0
    rows = measure(args.models, args.threads, scheme=args.scheme, bits=args.bits)
    _print(rows)
    missed = [row["model"] for row in rows if not row["met"]]
    if missed:
        print(f"missed target (int8 >= {AGAINST_PT2E}x pt2e and > fp32): {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
