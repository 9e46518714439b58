"""The ``bitsweep`` command. Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import sys
import warnings

import typer
from rich.console import Console
from rich.table import Table

from bitsweep.errors import BitsweepError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="How few bits can a vision model take? Data-free quantization sweeps over timm models.")
# Wide enough for tables when output goes to a file or CI log, not a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


def _print_version(value: bool):
    if value:
        from bitsweep import __version__

        console.print(f"bitsweep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command()
def plugins():
    """List every scheme, model source, dataset and compressor, and which plugin provides it."""
    from bitsweep.registry import HOOKS, get_registry

    registry = get_registry()
    table = Table("kind", "name", "plugin", "distribution", "version", "description")
    for kind in HOOKS:
        for entry in registry.entries(kind).values():
            table.add_row(kind, entry.name, entry.provider.plugin, entry.provider.distribution,
                          entry.provider.version, getattr(entry.obj, "description", ""))
    console.print(table)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A timm model name, e.g. resnet18."),
    scheme: str = typer.Option("symmetric", "--scheme", "-s"),
    bits: int = typer.Option(4, "--bits", "-b"),
    granularity: str = typer.Option("channel", "--granularity", "-g"),
    group_size: int | None = typer.Option(None, "--group-size"),
    keep_first: int = typer.Option(0, "--keep-first", help="Leave the first N Conv/Linear layers in fp32."),
    keep_last: int = typer.Option(0, "--keep-last", help="Leave the last N Conv/Linear layers in fp32."),
    pretrained: bool = typer.Option(False, help="Load timm's pretrained weights (needs them in the HF cache)."),
):
    """Quantize one timm model and print each layer's width and signal-to-quantization-noise ratio."""
    import torch

    from bitsweep.quantize import Policy, quantizable_layers, quantize_model
    from bitsweep.schemes import QuantSpec

    QuantSpec(scheme, bits, granularity, group_size)
    from bitsweep.registry import get_registry

    get_registry().get("scheme", scheme)
    fp32 = _create_timm_model(model, pretrained)
    policy = Policy(keep_first=keep_first, keep_last=keep_last)
    quantized = quantize_model(fp32, scheme, bits, granularity, policy, group_size=group_size)
    table = Table("layer", "shape", "bits", "SQNR dB")
    for name, layer in quantizable_layers(fp32):
        qt = quantized.quantized_layers.get(name)
        if qt is None:
            table.add_row(name, str(tuple(layer.weight.shape)), "fp32", "")
            continue
        w = layer.weight.detach()
        noise = (w - qt.dequantize()).pow(2).sum()
        sqnr = 10 * torch.log10(w.pow(2).sum() / noise).item() if noise > 0 else float("inf")
        table.add_row(name, str(tuple(w.shape)), str(qt.bits), f"{sqnr:.1f}")
    console.print(table)
    console.print(f"{len(quantized.quantized_layers)} of {len(quantizable_layers(fp32))} Conv/Linear layers "
                  f"quantized with {scheme} {bits}-bit per {granularity}")


def _create_timm_model(name: str, pretrained: bool):
    import difflib

    import timm

    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise BitsweepError(f"unknown timm model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained).eval()
    except Exception as exc:  # offline hub, missing cache...
        raise BitsweepError(f"cannot load pretrained weights for {name!r} ({type(exc).__name__}); "
                            "put them in the Hugging Face cache or quantize without --pretrained") from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"bitsweep: warning: {message}", file=file or sys.stderr)


def main():
    warnings.showwarning = _one_line_warning
    try:
        app()
    except BitsweepError as exc:
        print(f"bitsweep: error: {exc}", file=sys.stderr)
        sys.exit(2)
