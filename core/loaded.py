"""What a process keeps loaded for a sweep's steps: each model's fp32 module and the evaluation data
transformed for it, read once per process (per Dask worker) and shared read-only by the cells."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from bitsweep.cells import FP32_LOGITS, ModelRecord
from bitsweep.config import Sweep
from bitsweep.registry import get_registry


@functools.lru_cache(maxsize=8)
def _eval_data(dataset: str, options_json: str, data_config_json: str):
    data_config = json.loads(data_config_json)
    return get_registry().get("dataset", dataset).load("test", json.loads(options_json), data_config)


def eval_data(sweep: Sweep, module: torch.nn.Module):
    """The sweep's test split, transformed for this model (loaded once per process)."""
    config = timm.data.resolve_data_config({}, model=module)
    return _eval_data(sweep.dataset.name, json.dumps(sweep.dataset.options, sort_keys=True),
                      json.dumps(config, sort_keys=True, default=list))


@functools.lru_cache(maxsize=4)
def _fp32_module(record_dir: Path, arch: str, arch_kwargs_json: str) -> torch.nn.Module:
    model = timm.create_model(arch, pretrained=False, **json.loads(arch_kwargs_json))
    model.load_state_dict(load_file(record_dir / "fp32.safetensors"), strict=True)
    return model.eval()


def fp32_module(record: ModelRecord) -> torch.nn.Module:
    """The model's fp32 weights, loaded once per process and shared read-only by its cells."""
    return _fp32_module(record.dir, record.arch, json.dumps(record.arch_kwargs, sort_keys=True))


def fp32_logits(record: ModelRecord) -> dict[str, torch.Tensor]:
    """The fp32 model's logits on the evaluation data (and the labels, when the data has them)."""
    return load_file(record.dir / FP32_LOGITS)
