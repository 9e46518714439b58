"""Whole-model speed of the int8-compute path against fp32 eager, batch 1, one core.

    taskset -c 1 .venv/bin/python bench/int8_models.py              # speed table; exit 1 if a target is missed
    taskset -c 1 .venv/bin/python bench/int8_models.py --agreement  # top-1 agreement, real EfficientNet-Lite0

Models have random weights (speed does not depend on them); each is fake-quantized
(asymmetric 4-bit, per channel: exact on int8) and converted data-free, so the
conversion time includes synthesising calibration inputs. fp32 and int8 runs
alternate so that load from other processes hits both alike.

Beside them, when torchao is installed (``pip install torchao==0.18.0``), PyTorch's own fastest int8
CPU path as the incumbent: pt2e static quantization with torchao's ``X86InductorQuantizer`` compiled
by inductor (``pt2e`` columns) -- what the speed targets were set from on a CPU with AVX-512 VNNI.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import timm
import torch

import bitsweep
from bitsweep.compile import compile_packed
from bitsweep.int8 import to_int8
from kernels import _alternate

TARGETS = {"resnet18": 3.0, "mobilenetv3_large_100": 3.0, "vit_tiny_patch16_224": 1.5}
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


def measure(names, threads: int = 1, runs: int = 15) -> list[dict]:
    """One row per model: fp32 and int8 median ms, speedup, target, conversion seconds, exact layers."""
    torch.set_num_threads(threads)
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        fake = bitsweep.quantize_model(model, SCHEME, BITS)
        start = time.perf_counter()
        int8 = to_int8(fake, fake.quantized_layers)
        convert = time.perf_counter() - start
        weight_only = compile_packed(fake)
        x = torch.randn(1, 3, 224, 224)
        modules = {"fp32": model, "int8": int8, "weight-only": weight_only}
        incumbent = pt2e_int8(model, x)
        if incumbent is not None:
            modules["pt2e"] = incumbent
        medians = _alternate({key: lambda _, m=m: m(x) for key, m in modules.items()}, layers=1, repeats=runs)
        speedup = medians["fp32"] / medians["int8"]
        target = TARGETS.get(name)
        pt2e = f"{medians['fp32'] / medians['pt2e']:.2f}x" if "pt2e" in medians else "n/a (no torchao)"
        rows.append({"model": name, "fp32_ms": medians["fp32"] * 1e3, "int8_ms": medians["int8"] * 1e3,
                     "weight_only_ms": medians["weight-only"] * 1e3,
                     "speedup": speedup, "target": target, "met": target is None or speedup >= target,
                     "pt2e_speedup": pt2e, "convert_s": convert,
                     "exact": f"{sum(int8.int8_exact.values())}/{len(fake.quantized_layers)}",
                     "fp32_layers": len(int8.fp32_layers)})
    return rows


def agreement(configs=(("asymmetric", 8), ("symmetric", 6), ("pow2", 4), ("asymmetric", 4)),
              modes=("photos", "synthetic", "noise")) -> list[dict]:
    """Top-1 agreement of the int8 module with its fake-quant model on the offline photos
    (11 photos x 8 views), for trained EfficientNet-Lite0, per calibration mode:
    ``photos`` = 32 other crops of the same photos, ``synthetic`` = data-free default,
    ``noise`` = 8 standard-normal inputs (the naive data-free baseline)."""
    from bitsweep.plugins.efficientnet_lite import convert_state_dict, weights_path
    from bitsweep.plugins.imagefolder import preprocess
    from bitsweep.plugins.photos import load_photos, views_of

    torch.set_num_threads(1)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(state, model))
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    photos = load_photos()
    evaluation = preprocess([v for p in photos for v in views_of(p, 8)], config)
    calibration = preprocess([v for p in photos for v in views_of(p, 16)[8:11]], config).split(8)
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
            int8 = to_int8(fake, fake.quantized_layers, batches)
            convert = time.perf_counter() - start
            with torch.no_grad():
                top1 = int8(evaluation).argmax(1)
            rows.append({"scheme": f"{scheme}-{bits}", "calibration": mode,
                         "agree_fake": (top1 == fake_top1).float().mean().item(),
                         "agree_fp32": (top1 == reference).float().mean().item(),
                         "fake_agree_fp32": (fake_top1 == reference).float().mean().item(),
                         "exact": f"{sum(int8.int8_exact.values())}/{len(fake.quantized_layers)}",
                         "dead_channels": sum(int8.dead_channels.values()), "convert_s": convert})
    return rows


def _print(rows: list[dict]) -> None:
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(TARGETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--agreement", action="store_true", help="top-1 agreement table instead of speed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    if args.agreement:
        _print(agreement())
        return 0
    rows = measure(args.models, args.threads)
    _print(rows)
    missed = [row["model"] for row in rows if not row["met"]]
    if missed:
        print(f"missed target: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
