"""Speed of the packed n-bit kernels against fp32, one core by default.

    taskset -c 0 .venv/bin/python bench/kernels.py            # Linear table; exit 1 if a target is missed
    taskset -c 0 .venv/bin/python bench/kernels.py --quick    # Linear: 4096x4096 batch 1 only
    taskset -c 0 .venv/bin/python bench/kernels.py --only memory|models|linear

The CPU model and its vector features are printed first: every figure holds for that CPU only,
and every ratio is against incumbents measured in the same process on the same machine.

Linear: every layer's weights are cold (``LAYERS`` distinct layers are cycled, far more than
the caches hold), as in a real model where each weight is read once per token. fp32
``F.linear``, the packed kernel and (4-bit) PyTorch's int4pack kernel with bf16 activations
run alternately on the same layer index, so load from other processes hits all of them alike;
each figure is the median over all calls. At batch 1, ``read ms`` is the time to read the packed
bytes alone (no kernel reading them can be faster), measured the same way. torchao's int8 dynamic
Linear (int8 weights and activations, compiled by inductor as torchao intends; ``--no-torchao``
skips it) runs all layers in one compiled call, timed apart, per layer.

Whole models (batch 1): fp32 eager, the weight-only packed path, the pt2e incumbent and the int8 path
(``int8_models.py``). Memory: after ``load_packed``, the bytes of every tensor storage the
weight-only model holds, against the packed file's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

import torch
import torch.nn.functional as F
from int8_models import MODELS as INT8_MODELS
from int8_models import measure
from machine import alternate, cpu_summary

import bitsweep
from bitsweep import kernels
from bitsweep.pack import pack_bits

SHAPES = ((768, 3072), (3072, 768), (4096, 4096))  # (N, K): out x in features
BATCHES = (1, 8, 16, 32, 64)
SCHEMES = ("asymmetric", "symmetric", "pow2")
WIDTHS = tuple(range(2, 9))
LAYERS = 40
INT4_GROUP = 128


def linear_target(batch: int, scheme: str, bits: int) -> float:
    """Speed-up over fp32 ``F.linear`` the packed kernel must reach (cold weights); never below 1."""
    if batch == 1:
        return 4.0 if bits in (3, 4) and scheme != "pow2" else 3.0
    return 1.5 if batch <= 8 else 1.0


INT4_TARGET = 2.0  # batch 1, 3- and 4-bit linear schemes: at least this much faster than int4pack with bf16


def _packed_layers(n: int, k: int, bits: int, scheme: str, layers: int) -> list[kernels.KernelWeight]:
    """``layers`` copies of a Gaussian ``[n, k]`` weight quantized per channel by the scheme, as a model's would
    be. (Uniformly random codes would be unlike any model's: at pow2 8 bits, 6-8 % of them would decode to
    subnormal floats, which no trained weight does unless it is itself below 2^-126 of its channel's max.)"""
    codec = bitsweep.schemes()[scheme]
    qmin = codec.code_range(bits)[0]
    lut = codec.decode(torch.arange(qmin, qmin + 2**bits), torch.ones(()), torch.zeros(()), bits).to(torch.float32)
    rows = torch.randn(n, k) * 0.02
    scale, zero = codec.fit(rows, bits)
    scale, zero = scale.reshape(n, 1), zero.reshape(n, 1)
    u = (codec.encode(rows, scale, zero, bits) - qmin).to(torch.uint8).reshape(-1)
    first = kernels.KernelWeight.build(pack_bits(u, bits), n, k, bits, lut, scale, zero.float(), k)
    # Prepared once and copied, so every layer's bytes live at their own addresses.
    return [dataclasses.replace(first, codes=first.codes.clone()) for _ in range(layers)]


def _int4_layers(n: int, k: int, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(layers):
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        out.append((packed, torch.rand(k // INT4_GROUP, n, 2).bfloat16()))
    return out


def _torchao_int8_seconds(n: int, k: int, x: torch.Tensor, layers: int, repeats: int) -> float | None:
    """Median seconds per layer of torchao's int8 dynamic Linear over ``layers`` cold layers, or ``None``
    without torchao. All layers run in one compiled call (compiling per layer would recompile per module)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linears = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for _ in range(layers))

        def forward(self, x):
            return [linear(x) for linear in self.linears]

    model = Layers()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    # Each call's Layers is a new class with the same forward: without a reset, dynamo's guards fail on every
    # call after the first and, past its recompile limit (8), it silently runs the rest eagerly.
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inductor's notices, one per layer
        compiled = torch.compile(model)
        seconds = alternate({"torchao": lambda _: compiled(x)}, 1, repeats)["torchao"]
    return seconds / layers


def read_only(codes: torch.Tensor) -> torch.Tensor:
    """Reads every byte of ``codes`` once and nothing more (an int32 maximum): the least time any kernel
    reading them can take, which bounds the speed-up over an incumbent reading as many bytes."""
    return codes[: codes.numel() // 4 * 4].view(torch.int32).amax()


def linear_rows(n: int, k: int, batches=BATCHES, schemes=SCHEMES, widths=WIDTHS, layers: int = LAYERS,
                repeats: int = 5, torchao: bool = True) -> list[dict]:
    """One row per (batch, scheme, width) for the ``[n, k]`` Linear."""
    torch.manual_seed(0)
    base = torch.randn(n, k)
    dense = [base.clone() for _ in range(layers)]
    int4 = _int4_layers(n, k, layers) if 4 in widths else None
    int8 = {batch: _torchao_int8_seconds(n, k, torch.randn(batch, k), layers, 2 if batch > 8 else repeats)
            for batch in batches} if torchao else {}
    rows = []
    for scheme in schemes:
        for bits in widths:
            packed = _packed_layers(n, k, bits, scheme, layers)
            for batch in batches:
                x = torch.randn(batch, k)
                xb = x.bfloat16()
                calls = {"fp32": lambda i: F.linear(x, dense[i]), "packed": lambda i: packed[i].linear(x)}
                if batch == 1:
                    calls["read"] = lambda i: read_only(packed[i].codes)
                if bits == 4:
                    calls["int4"] = lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, int4[i][0], INT4_GROUP,
                                                                                        int4[i][1])
                t = alternate(calls, layers, repeats)
                speedup = t["fp32"] / t["packed"]
                target = linear_target(batch, scheme, bits)
                versus_int4 = t["int4"] / t["packed"] if "int4" in t else None
                int4_ok = batch != 1 or scheme == "pow2" or versus_int4 is None or versus_int4 >= INT4_TARGET
                int8_ms = int8[batch] * 1e3 if int8.get(batch) is not None else None
                rows.append({"shape": f"{n}x{k}", "batch": batch, "scheme": scheme, "bits": bits,
                             "fp32_ms": t["fp32"] * 1e3, "packed_ms": t["packed"] * 1e3, "speedup": speedup,
                             "read_ms": t["read"] * 1e3 if "read" in t else None,
                             "int4_bf16_ms": t["int4"] * 1e3 if "int4" in t else None, "int8_dyn_ms": int8_ms,
                             "target": target, "ok": speedup >= target and int4_ok})
            packed = None  # frees this width's layers before the next is built
    return rows


def linear_table(threads: int = 1, shapes=SHAPES, **kwargs) -> list[dict]:
    """The Linear speed table: every shape x batch x scheme x width, with its target and verdict."""
    torch.set_num_threads(threads)
    return [row for n, k in shapes for row in linear_rows(n, k, **kwargs)]


LINEAR_HEADER = (f"{'shape':>10} {'batch':>5} {'scheme':>10} {'bits':>4} {'fp32 ms':>8} {'packed ms':>9} "
                 f"{'speed-up':>8} {'read ms':>7} {'int4 bf16 ms':>12} {'int8 dyn ms':>11} {'target':>6}  ok")


def column(value: float | None, width: int) -> str:
    return f"{value:{width}.3f}" if value is not None else f"{'':>{width}}"


def print_linear(rows: list[dict]) -> None:
    """The rows, then a line for each batch-1 row whose int4pack target asks for less time than reading
    its bytes takes (no kernel can meet it on this machine)."""
    for r in rows:
        print(f"{r['shape']:>10} {r['batch']:>5} {r['scheme']:>10} {r['bits']:>4} {r['fp32_ms']:8.3f} "
              f"{r['packed_ms']:9.3f} {r['speedup']:7.2f}x {column(r['read_ms'], 7)} {column(r['int4_bf16_ms'], 12)} "
              f"{column(r['int8_dyn_ms'], 11)} {r['target']:5.1f}x  {'yes' if r['ok'] else 'NO'}", flush=True)
    for r in rows:
        if r["batch"] == 1 and r["int4_bf16_ms"] is not None and r["scheme"] != "pow2":
            needed = r["int4_bf16_ms"] / INT4_TARGET
            if needed < r["read_ms"]:
                print(f"{r['shape']} {r['scheme']} {r['bits']}-bit: {INT4_TARGET:g}x int4pack needs {needed:.3f} ms, "
                      f"less than reading the packed bytes alone takes ({r['read_ms']:.3f} ms)")


# --- whole models -------------------------------------------------------------------------

MODELS = ("resnet18", "mobilenetv3_large_100", "vit_tiny_patch16_224")


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage the module holds: parameters, buffers and packed codes."""
    from bitsweep.compile import PackedConv, PackedLinear

    tensors = [*module.parameters(), *module.buffers()]
    for layer in module.modules():
        if isinstance(layer, PackedLinear | PackedConv):
            held = (*vars(layer.meta).values(), *vars(layer.kernel).values())
            tensors += [t for t in held if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def memory_table(bits: int = 4) -> list[dict]:
    """After ``load_packed``: resident weight bytes of the weight-only path against the file's size."""
    import tempfile
    from pathlib import Path

    import timm

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in MODELS:
            model = timm.create_model(arch, pretrained=False).eval()
            path = bitsweep.save_packed(bitsweep.quantize_model(model, "symmetric", bits), Path(folder) / f"{arch}.st")
            del model
            loaded = bitsweep.load_packed(path)
            size, resident = path.stat().st_size, resident_bytes(loaded)
            rows.append({"model": arch, "bits": bits, "file MB": size / 1e6, "resident MB": resident / 1e6,
                         "ratio": resident / size, "target": 1.1, "ok": resident <= 1.1 * size})
    return rows


def model_table(threads: int = 1) -> list[dict]:
    """Whole models at batch 1 (``int8_models.py``): fp32 eager, weight-only, pt2e and the int8 path."""
    return measure(list(INT8_MODELS), threads=threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="only 4096x4096 at batch 1")
    parser.add_argument("--only", choices=("linear", "models", "memory"), help="one table instead of all three")
    parser.add_argument("--no-torchao", action="store_true", help="skip torchao's int8 dynamic Linear (compiles)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_summary(), flush=True)
    if kernels.extension() is None:
        print("compiled kernels unavailable: nothing to measure", file=sys.stderr)
        return 1
    missed = 0
    if args.only in (None, "memory"):
        rows = memory_table()
        print(f"{'model':>22} {'bits':>4} {'file MB':>8} {'resident MB':>11} {'ratio':>6} {'target':>6}  ok")
        for r in rows:
            print(f"{r['model']:>22} {r['bits']:>4} {r['file MB']:8.2f} {r['resident MB']:11.2f} {r['ratio']:6.3f} "
                  f"{r['target']:6.1f}  {'yes' if r['ok'] else 'NO'}", flush=True)
        missed += sum(not r["ok"] for r in rows)
    if args.only in (None, "models"):
        rows = model_table(args.threads)
        print(f"\n{'model':>22} {'fp32 ms':>8} {'weight-only ms':>14} {'pt2e ms':>8} {'int8 ms':>8} {'x fp32':>7} "
              f"{'x pt2e':>7}  ok")
        for r in rows:
            pt2e = f"{r['pt2e_ms']:8.1f}" if r["pt2e_ms"] is not None else f"{'':>8}"
            versus = f"{r['vs_pt2e']:6.2f}x" if r["vs_pt2e"] is not None else f"{'':>7}"
            print(f"{r['model']:>22} {r['fp32_ms']:8.1f} {r['weight_only_ms']:14.1f} {pt2e} {r['int8_ms']:8.1f} "
                  f"{r['speedup']:6.2f}x {versus}  {'yes' if r['met'] else 'NO'}", flush=True)
        missed += sum(not r["met"] for r in rows)
    if args.only in (None, "linear"):
        shapes, batches = (((4096, 4096),), (1,)) if args.quick else (SHAPES, BATCHES)
        print("\n" + LINEAR_HEADER, flush=True)
        rows = []
        for n, k in shapes:
            rows += linear_rows(n, k, batches=batches, torchao=not args.no_torchao)
            print_linear(rows[-len(batches) * len(SCHEMES) * len(WIDTHS):])
        print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} Linear targets met")
        missed += sum(not r["ok"] for r in rows)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
