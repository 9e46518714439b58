"""``flows.yaml``: one pydantic model for sweeps and deployments; errors point at the exact entry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from bitsweep.calibration import CALIBRATION_IMAGES
from bitsweep.datasets import EVALUATION_SPLIT, SPLITS
from bitsweep.errors import BitsweepError, first_line
from bitsweep.models import ModelSpec
from bitsweep.policy import Policy
from bitsweep.registry import get_registry
from bitsweep.schemes import GRANULARITIES, MAX_BITS, MIN_BITS
from bitsweep.synthetic import STEPS, SyntheticSettings

DEFAULT_CONFIG = Path("flows.yaml")


def _bits_in_range(bits: int) -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{bits} is outside {MIN_BITS}..{MAX_BITS}")
    return bits


def _named_entry(value):
    """A bare name stands for ``{name: NAME}`` (models, a calibration dataset)."""
    return {"name": value} if isinstance(value, str) else value


def _policy_entry(value):
    if not isinstance(value, str | type(None)):
        return value
    try:
        return Policy.parse(value)
    except BitsweepError as exc:
        raise ValueError(str(exc)) from None


def _check_registered(kind: str, name: str) -> str:
    problem = get_registry().missing(kind, name)  # names a failed plugin that may provide it
    if problem:
        raise ValueError(problem)
    return name


def _registered(kind: str):
    return AfterValidator(lambda name: _check_registered(kind, name))


Bits = Annotated[int, Field(strict=True), AfterValidator(_bits_in_range)]
SchemeName = Annotated[str, _registered("scheme")]
CompressorName = Annotated[str, _registered("compressor")]
NO_RECIPE = "none"  # in `recipes:`, plain rounding to the nearest level


def _recipe_name(name: str) -> str:
    return name if name == NO_RECIPE else _check_registered("recipe", name)


RecipeName = Annotated[str, AfterValidator(_recipe_name)]


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


def _positive_or_auto(value):
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{value!r} is neither a positive number of super-classes nor 'auto'")
    return value


class Clustering(_Strict):
    """The cluster step: how many super-classes, and from which view of class similarity."""

    k: Annotated[int | Literal["auto"], BeforeValidator(_positive_or_auto)] = Field(
        "auto", description="super-classes, or auto: cut at the largest gap in the class tree")
    source: Literal["auto", "weights", "confusion"] = Field(
        "auto", description="what super-class scores use; auto: confusion on labelled data, else weights")


class Sensitivity(_Strict):
    """Accuracy when only one layer is quantized, per layer and width: which layers the bits matter for."""

    images: int = Field(0, ge=0, description="evaluation images to use; 0 leaves the step out")
    schemes: list[SchemeName] | None = Field(None, description="schemes to try (default: the sweep's first)")


class Synthetic(_Strict):
    """The synthetic images every data-free step uses (recipes, ``allocate``): how many, optimised how long."""

    images: int | None = Field(None, ge=1, description="images to synthesise (default: as many as 8 images of "
                                                       "224 x 224 hold in pixels, at most 1024)")
    steps: int = Field(STEPS, ge=0, description="Adam steps matching each batch to the BatchNorm statistics")

    def settings(self) -> SyntheticSettings:
        return SyntheticSettings(images=self.images, steps=self.steps)


class Calibration(_Strict):
    """Real images for every data-free step (recipes, ``allocate``, the int8 path's activation ranges) in place
    of synthetic ones: ``images`` drawn (seeded) from a dataset's ``split``, never the evaluated one."""

    dataset: Annotated[DatasetSpec, BeforeValidator(_named_entry)]
    split: Literal[SPLITS] = "train"
    images: int = Field(CALIBRATION_IMAGES, ge=1, description="images drawn from the split (seeded)")

    @property
    def label(self) -> str:
        """As tables show it: ``DATASET SPLIT IMAGES``."""
        return f"{self.dataset.name} {self.split} {self.images}"


class Sweep(_Strict):
    """One grid: models x schemes x bits x granularity x policies, on one dataset."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    models: list[Annotated[ModelSpec, BeforeValidator(_named_entry)]] = Field(min_length=1)
    dataset: DatasetSpec
    schemes: list[SchemeName] = Field(min_length=1)
    bits: list[Bits] = Field(min_length=1)
    granularity: list[Literal[GRANULARITIES]] = ["channel"]
    group_size: int | None = Field(None, ge=1)
    policies: list[Annotated[Policy, BeforeValidator(_policy_entry)]] = [Policy(name="full")]
    compressors: list[CompressorName] = ["gzip", "7z", "zstd"]
    recipes: list[RecipeName] = Field([NO_RECIPE], min_length=1)
    kernels: list[Literal["weight-only", "int8"]] = Field(["weight-only"], min_length=1)
    evaluation: Evaluation = Evaluation()
    clustering: Clustering = Clustering()
    sensitivity: Sensitivity = Sensitivity()
    synthetic: Synthetic = Synthetic()
    calibration: Calibration | None = None
    output: Path | None = None

    @model_validator(mode="after")
    def _no_repeats(self):
        for key in ("schemes", "bits", "granularity", "compressors", "recipes", "kernels"):
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

    @model_validator(mode="after")
    def _calibration_apart(self):
        calibration = self.calibration
        if calibration is None:
            return self
        if "synthetic" in self.model_fields_set:
            raise ValueError("calibration and synthetic each choose the data-free steps' images; keep one")
        if calibration.dataset.name == self.dataset.name and calibration.split == EVALUATION_SPLIT:
            raise ValueError(f"calibration: {calibration.dataset.name} split {EVALUATION_SPLIT} is the data this "
                             f"sweep evaluates on; calibrate on split: train or on another dataset")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output or Path("runs") / self.name


def _cron(expression: str) -> str:
    from croniter import croniter  # the parser Prefect's schedules use (vendored there)

    if not croniter.is_valid(expression) or any(f.lower() in ("h", "r") for f in expression.split()):
        raise ValueError(f"{expression!r} is not a cron schedule; write five fields, minute hour day-of-month "
                         f"month day-of-week, e.g. '0 3 * * *' for 03:00 every day")
    return expression


def _scheduler_address(address: str) -> str:
    if not re.fullmatch(r"(tcp|tls|ucx|inproc)://\S+", address):
        raise ValueError(f"{address!r} is not a Dask scheduler address; write e.g. tcp://10.0.0.5:8786")
    return address


class Deployment(_Strict):
    """A scheduled run of one sweep (registered by ``bitsweep deploy``)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    sweep: str
    cron: Annotated[str, AfterValidator(_cron)]
    parameters: dict = {}


class Runner(_Strict):
    """Where cells run: threads in this process, or Dask (the scheduler at ``address``, else a local cluster)."""

    kind: Literal["thread", "dask"] = "thread"
    address: Annotated[str, AfterValidator(_scheduler_address)] | None = None
    workers: int | None = Field(None, ge=1, description="cells at once: threads, or local Dask worker processes "
                                                        "(default: cores / evaluation.threads)")
    memory_gb: float | None = Field(None, gt=0, description="memory running cells may hold together "
                                                            "(default: 80 % of the RAM available at start)")

    @model_validator(mode="after")
    def _address_is_dask(self):
        if self.address and self.kind != "dask":
            raise ValueError("address is a Dask scheduler's: set kind: dask with it")
        return self


class Config(_Strict):
    sweeps: list[Sweep] = Field(min_length=1)
    deployments: list[Deployment] = []
    runner: Runner = Runner()

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sweeps]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sweep names must be unique; repeated: {', '.join(duplicates)}")
        deployments = [d.name for d in self.deployments]
        repeated = sorted({n for n in deployments if deployments.count(n) > 1})
        if repeated:
            raise ValueError(f"deployment names must be unique; repeated: {', '.join(repeated)}")
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
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise BitsweepError(f"{path}: {line}not valid YAML ({problem})") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, a date that does not exist, nesting too deep
        raise BitsweepError(f"{path}: not valid YAML ({type(exc).__name__}: {first_line(exc)})") from None
    except OSError as exc:
        raise BitsweepError(f"{path}: cannot read ({exc.strerror or exc}); pass --config PATH of a readable file") \
            from None
    return parse_config(data, str(path))
