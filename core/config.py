"""``flows.yaml``: one pydantic model for sweeps and deployments; errors point at the exact entry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from bitsweep.errors import BitsweepError
from bitsweep.models import ModelSpec
from bitsweep.quantize import Policy
from bitsweep.schemes import GRANULARITIES, MAX_BITS, MIN_BITS

DEFAULT_CONFIG = Path("flows.yaml")


def _bits_in_range(bits: int) -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{bits} is outside {MIN_BITS}..{MAX_BITS}")
    return bits


def _model_entry(value):
    return {"name": value} if isinstance(value, str) else value


def _policy_entry(value):
    if not isinstance(value, str | type(None)):
        return value
    try:
        return Policy.parse(value)
    except BitsweepError as exc:
        raise ValueError(str(exc)) from None


def _registered(kind: str):
    def check(name: str) -> str:
        from bitsweep.registry import get_registry

        entries = get_registry().entries(kind)
        if name not in entries:
            raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(entries))}")
        return name

    return AfterValidator(check)


Bits = Annotated[int, Field(strict=True), AfterValidator(_bits_in_range)]
SchemeName = Annotated[str, _registered("scheme")]
CompressorName = Annotated[str, _registered("compressor")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(BaseModel):
    """A registered dataset and its options (``path``, ``limit``...) as further keys."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: Annotated[str, _registered("dataset")]

    @property
    def options(self) -> dict:
        return dict(self.model_extra or {})


class Evaluation(_Strict):
    batch_size: int = Field(256, ge=1)
    latency_repeats: int = Field(20, ge=1, description="single-image forward passes timed for batch-1 latency")
    threads: int = Field(1, ge=1, description="torch threads per cell; cells run in parallel on the other cores")


class Sweep(_Strict):
    """One grid: models x schemes x bits x granularity x policies, on one dataset."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    models: list[Annotated[ModelSpec, BeforeValidator(_model_entry)]] = Field(min_length=1)
    dataset: DatasetSpec
    schemes: list[SchemeName] = Field(min_length=1)
    bits: list[Bits] = Field(min_length=1)
    granularity: list[Literal[GRANULARITIES]] = ["channel"]
    group_size: int | None = Field(None, ge=1)
    policies: list[Annotated[Policy, BeforeValidator(_policy_entry)]] = [Policy(name="full")]
    compressors: list[CompressorName] = ["gzip", "7z", "zstd"]
    kernels: list[Literal["weight-only", "int8"]] = Field(["weight-only"], min_length=1)
    evaluation: Evaluation = Evaluation()
    output: Path | None = None

    @model_validator(mode="after")
    def _no_repeats(self):
        for key in ("schemes", "bits", "granularity", "compressors", "kernels"):
            values = getattr(self, key)
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{key} lists {', '.join(repeated)} more than once")
        return self

    @model_validator(mode="after")
    def _group_size_with_group(self):
        if ("group" in self.granularity) != (self.group_size is not None):
            raise ValueError("group_size is needed exactly when granularity lists 'group'")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output or Path("runs") / self.name


class Deployment(_Strict):
    """A scheduled run of one sweep (registered by ``bitsweep deploy``)."""

    name: str
    sweep: str
    cron: str
    parameters: dict = {}


class Config(_Strict):
    sweeps: list[Sweep] = Field(min_length=1)
    deployments: list[Deployment] = []

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sweeps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sweep names must be unique; repeated: {', '.join(duplicates)}")
        for deployment in self.deployments:
            if deployment.sweep not in names:
                raise ValueError(f"deployment {deployment.name!r} names sweep {deployment.sweep!r}, "
                                 f"which is not one of: {', '.join(names)}")
        return self

    def sweep(self, name: str | None) -> list[Sweep]:
        """The named sweep, or every sweep when ``name`` is None."""
        if name is None:
            return list(self.sweeps)
        for sweep in self.sweeps:
            if sweep.name == name:
                return [sweep]
        raise BitsweepError(f"no sweep named {name!r}; flows.yaml has: {', '.join(s.name for s in self.sweeps)}")


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "constrained-")):
            out += f".{part}" if out else str(part)
    return out


def parse_config(data: object, source: str = "flows.yaml") -> Config:
    """Validate already-parsed YAML; the first problem becomes one line: file, path inside it, fix."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        where = _location(error["loc"])
        if error["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the README's flows.yaml reference"
        if error["type"] == "missing":
            message = "required key is missing"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise BitsweepError(f"{source}: {where or 'top level'}: {message}{more}") from None


def load_config(path: Path = DEFAULT_CONFIG) -> Config:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BitsweepError(f"{path}: no such file; run from the project folder or pass --config PATH") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise BitsweepError(f"{path}: {line}not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_config(data, str(path))
