"""The pack step: a quantized model as one safetensors file of integer codes, scales and the
remaining fp32 tensors, with a JSON header that says how to rebuild and decode it.

Codes are stored one per byte here (the compressors then see them as they are); the
model is rebuilt from the file alone (plus timm), never from a pickled object.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.files import atomic_path
from bitsweep.registry import get_registry
from bitsweep.schemes import QuantizedTensor

FORMAT = "bitsweep-codes/1"


def save_codes(quantized: nn.Module, arch: str, arch_kwargs: dict, path: Path) -> Path:
    """Write ``quantize_model``'s output: codes for quantized layers, fp32 for everything else."""
    layers = quantized.quantized_layers
    tensors, header = {}, {}
    for name, tensor in quantized.state_dict().items():
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in layers:
            continue
        tensors[name] = tensor.detach().contiguous()
    for name, qt in layers.items():
        tensors[f"{name}.weight.codes"] = qt.codes.contiguous()
        tensors[f"{name}.weight.scale"] = qt.scale.contiguous()
        tensors[f"{name}.weight.zero_point"] = qt.zero_point.contiguous()
        header[name] = {"scheme": qt.scheme, "bits": qt.bits, "granularity": qt.granularity,
                        "group_size": qt.group_size, "qmin": qt.qmin, "qmax": qt.qmax, "dtype": str(qt.dtype)}
    from bitsweep import __version__

    # One metadata key: safetensors writes several in hash order, which would make equal models differ by byte.
    header = {"format": FORMAT, "bitsweep": __version__, "arch": arch, "arch_kwargs": arch_kwargs, "layers": header}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"bitsweep": json.dumps(header, sort_keys=True)})
    return Path(path)


def load_codes(path: Path) -> nn.Module:
    """Rebuild the fake-quantized model from a codes file: timm architecture + decoded weights."""
    path = Path(path)
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as handle:
            header = json.loads((handle.metadata() or {}).get("bitsweep", "{}"))
        if header.get("format") != FORMAT:
            raise BitsweepError(f"{path}: not a {FORMAT} file (format {header.get('format')!r})")
        layers = header["layers"]
        model = timm.create_model(header["arch"], pretrained=False, **header["arch_kwargs"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise BitsweepError(f"{path}: unreadable codes file ({type(exc).__name__}: {exc}); "
                            "delete it and rerun the sweep to recreate it") from None
    records = {}
    for name, info in layers.items():
        qt = QuantizedTensor(
            codes=tensors.pop(f"{name}.weight.codes"), scale=tensors.pop(f"{name}.weight.scale"),
            zero_point=tensors.pop(f"{name}.weight.zero_point"), qmin=info["qmin"], qmax=info["qmax"],
            bits=info["bits"], scheme=info["scheme"], granularity=info["granularity"],
            group_size=info["group_size"], dtype=getattr(torch, info["dtype"].removeprefix("torch.")),
            codec=get_registry().get("scheme", info["scheme"]))
        tensors[f"{name}.weight"] = qt.dequantize()
        records[name] = qt
    model.load_state_dict(tensors, strict=True)
    model.quantized_layers = records
    return model.eval()


def code_entropy_bytes(quantized: nn.Module) -> float:
    """Order-0 entropy of each layer's codes, summed, in bytes: the floor for any code compressor."""
    total_bits = 0.0
    for qt in quantized.quantized_layers.values():
        counts = torch.bincount((qt.codes.to(torch.int32) - qt.qmin).flatten()).double()
        p = counts[counts > 0] / counts.sum()
        total_bits += float(-(p * p.log2()).sum()) * qt.codes.numel()
    return total_bits / 8
