"""What a process keeps loaded for a sweep's steps: each model's fp32 module, and the evaluation and
calibration data transformed for it, read once per process (per Dask worker) and shared read-only by the
cells."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from bitsweep.calibration import draw
from bitsweep.cells import FP32_LOGITS, ModelRecord, expand_models
from bitsweep.config import Calibration, Sweep
from bitsweep.datasets import EVALUATION_SPLIT, ImageSet
from bitsweep.registry import get_registry


@functools.lru_cache(maxsize=8)
def _split(dataset: str, options_json: str, split: str, data_config_json: str) -> ImageSet:
    data_config = json.loads(data_config_json)
    return get_registry().get("dataset", dataset).load(split, json.loads(options_json), data_config)


def _config_json(module: torch.nn.Module | None) -> str:
    """timm's data config for ``module`` (None: the dataset's default), as a cache key."""
    config = None if module is None else timm.data.resolve_data_config({}, model=module)
    return json.dumps(config, sort_keys=True, default=list)


def _load(dataset, split: str, module: torch.nn.Module | None) -> ImageSet:
    """``split`` of a sweep's ``dataset`` entry, transformed for ``module`` (None: the dataset's default)."""
    return _split(dataset.name, json.dumps(dataset.options, sort_keys=True), split, _config_json(module))


def eval_data(sweep: Sweep, module: torch.nn.Module | None) -> ImageSet:
    """The sweep's test split, transformed for this model (loaded once per process)."""
    return _load(sweep.dataset, EVALUATION_SPLIT, module)


def calibration_images(sweep: Sweep, module: torch.nn.Module | None) -> torch.Tensor | None:
    """The sweep's calibration images transformed for this model (None: the sweep has none, its data-free
    steps read synthetic inputs); one line when there are too few, or any is an evaluation image."""
    calibration: Calibration | None = sweep.calibration
    if calibration is None:
        return None
    return _drawn(calibration.dataset.name, json.dumps(calibration.dataset.options, sort_keys=True),
                  calibration.split, calibration.images, sweep.dataset.name,
                  json.dumps(sweep.dataset.options, sort_keys=True), _config_json(module))


@functools.lru_cache(maxsize=4)
def _drawn(name: str, options_json: str, split: str, count: int, evaluation: str, evaluation_options_json: str,
           config_json: str) -> torch.Tensor:
    """``calibration_images``, drawn once per process: the overlap check reads every evaluation image, and
    every cell of the model asks."""
    with get_registry().blame("dataset", name):
        data = _split(name, options_json, split, config_json)
    return draw(data, count, f"{name} split {split}",
                _split(evaluation, evaluation_options_json, EVALUATION_SPLIT, config_json))


@functools.lru_cache(maxsize=4)
def _fp32_module(record_dir: Path, arch: str, arch_kwargs_json: str, input_size: tuple[int, ...]) -> torch.nn.Module:
    model = timm.create_model(arch, pretrained=False, **json.loads(arch_kwargs_json))
    model.load_state_dict(load_file(record_dir / "fp32.safetensors"), strict=True)
    # timm's config names the architecture's own input size; synthetic inputs and transforms read this one.
    model.pretrained_cfg = {**(model.pretrained_cfg or {}), "input_size": input_size}
    return model.eval()


def fp32_module(record: ModelRecord) -> torch.nn.Module:
    """The model's fp32 weights, loaded once per process and shared read-only by its cells, taking the input
    size of the sweep's evaluation images (a ``trained`` model's, not its architecture's)."""
    return _fp32_module(record.dir, record.arch, json.dumps(record.arch_kwargs, sort_keys=True), record.input_size)


def fp32_logits(record: ModelRecord) -> dict[str, torch.Tensor]:
    """The fp32 model's logits on the evaluation data (and the labels, when the data has them)."""
    return load_file(record.dir / FP32_LOGITS)


def check_sweeps(sweeps: list[Sweep], data_here: bool = True) -> None:
    """Fail in one line on what would fail every cell -- a model name or glob that matches nothing, a
    dataset's missing files or misspelt options, a calibration set too small or sharing images with the
    evaluation data -- before anything runs or is written. With
    ``data_here`` False (cells run on an existing Dask cluster, whose workers hold the data and this
    machine may not) datasets are left to the cells."""
    registry = get_registry()
    for sweep in sweeps:
        expand_models(sweep)
        if not data_here:
            continue
        for dataset in (sweep.dataset, *([sweep.calibration.dataset] if sweep.calibration else [])):
            with registry.blame("dataset", dataset.name):
                registry.get("dataset", dataset.name).check(dataset.options)
        calibration_images(sweep, None)  # too few, or shared with the evaluation data: one line now
