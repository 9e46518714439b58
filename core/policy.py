"""Which layers a scheme quantizes and at what width: the Conv/Linear layers of a model, and the
precision policy (the paper's partial quantization) that picks among them."""

from __future__ import annotations

import fnmatch

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.schemes import MAX_BITS, MIN_BITS

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Policy(BaseModel):
    """Which layers to quantize and at what width: the paper's partial quantization.

    Layers are the model's Conv/Linear modules in module order. A layer is
    quantized when its name matches an ``include`` glob, matches no ``exclude``
    glob and is not among the first ``keep_first`` or last ``keep_last`` layers.
    ``bits`` maps name globs to a width that overrides the sweep's (first match wins).
    ``allocate`` instead lets ``bitsweep.allocate`` choose each layer's width so that the
    quantized weights average the width asked for, the most sensitive layers kept wider.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    bits: dict[str, int] = Field(default_factory=dict)
    keep_first: int = Field(0, ge=0)
    keep_last: int = Field(0, ge=0)
    allocate: bool = False

    @field_validator("bits")
    @classmethod
    def _widths_in_range(cls, bits):
        for pattern, width in bits.items():
            if not MIN_BITS <= width <= MAX_BITS:
                raise ValueError(f"bits for {pattern!r} is {width}, outside {MIN_BITS}..{MAX_BITS}")
        return bits

    @model_validator(mode="after")
    def _one_source_of_widths(self):
        if self.allocate and self.bits:
            raise ValueError("allocate chooses every layer's width itself; drop either bits or allocate")
        return self

    @model_serializer(mode="wrap")
    def _without_default_allocate(self, handler):
        """Policies without ``allocate`` serialise as before it existed: their cells' resume keys stay valid."""
        data = handler(self)
        if not self.allocate:
            data.pop("allocate", None)
        return data

    @classmethod
    def parse(cls, value: Policy | str | dict | None) -> Policy:
        """``None``/``"full"`` -> quantize everything; a dict -> its fields; a Policy as is."""
        if value is None or value == "full":
            return cls(name="full")
        if isinstance(value, Policy):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise BitsweepError(f"policy {value!r} is not understood; use 'full' or a mapping such as {{keep_first: 1}}")

    @property
    def label(self) -> str:
        """A short name for tables: the given name, or the fields that differ from 'full'."""
        if self.name:
            return self.name
        changed = self.model_dump(exclude_defaults=True, exclude={"name"})
        return ",".join(k if v is True else f"{k}={v}" for k, v in changed.items()) or "full"

    def plan(self, layer_names: list[str], bits: int) -> dict[str, int]:
        """Layer name -> width, for the layers this policy quantizes."""
        last = len(layer_names) - self.keep_last
        chosen = {}
        for index, name in enumerate(layer_names):
            if index < self.keep_first or index >= last:
                continue
            if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            chosen[name] = next((w for p, w in self.bits.items() if fnmatch.fnmatchcase(name, p)), bits)
        return chosen


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear modules whose weights a scheme quantizes, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
