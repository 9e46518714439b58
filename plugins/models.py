"""Built-in model sources: timm's registry, a local checkpoint, and models trained on the sweep's data."""

from __future__ import annotations

import contextlib
import difflib
import pickle
import socket
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

import bitsweep
from bitsweep.datasets import content_hash
from bitsweep.errors import BitsweepError
from bitsweep.files import atomic_path
from bitsweep.models import LoadedModel, ModelSource, ModelSpec
from bitsweep.train import TrainingSettings, classifier_kwargs, train_classifier, training_key


def _check_timm_name(name: str) -> None:
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise BitsweepError(f"unknown timm model {name!r}; {hint}")


def create_timm_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with a clear error and close-name suggestions for unknown names."""
    _check_timm_name(name)
    return timm.create_model(name, **kwargs)


def _timm_kwargs(source: str, spec: ModelSpec, allowed: set[str]) -> dict:
    options = spec.options
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BitsweepError(f"model {spec.id!r} (source {source}): unknown option(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(allowed))}")
    return dict(options.get("kwargs", {}))


MAX_GLOB_MODELS = 100  # a glob such as "*" (1371 models) is a slip, not a sweep


class Timm(ModelSource):
    name = "timm"
    description = "any timm architecture by name or glob; pretrained weights from the Hugging Face cache"

    def expand(self, spec):
        if not any(c in spec.name for c in "*?["):
            _check_timm_name(spec.name)
            return [spec]
        names = timm.list_models(spec.name, pretrained=bool(spec.options.get("pretrained")))
        if not names:
            raise BitsweepError(f"model glob {spec.name!r} matches no timm model; fix the pattern "
                                f"(python -c \"import timm; print(timm.list_models('{spec.name}'))\" lists matches)")
        if len(names) > MAX_GLOB_MODELS:
            raise BitsweepError(f"model glob {spec.name!r} matches {len(names)} timm models, more than the "
                                f"{MAX_GLOB_MODELS} one entry may stand for; narrow it (e.g. '{names[0]}*') "
                                "or split it into several entries")
        return [spec.model_copy(update={"name": n, "label": None}) for n in names]

    def load(self, spec, context):
        kwargs = _timm_kwargs(self.name, spec, {"pretrained", "kwargs"})
        pretrained = bool(spec.options.get("pretrained", False))
        model = create_timm_model(spec.name, pretrained=False, **kwargs)
        if pretrained:
            try:
                with _hub_offline_unless_reachable():
                    model = timm.create_model(spec.name, pretrained=True, **kwargs)
            except Exception as exc:  # offline hub, missing cache entry, gated repo...
                raise BitsweepError(
                    f"model {spec.name!r}: pretrained weights cannot be had ({type(exc).__name__}); put them in "
                    "the Hugging Face cache (HF_HOME) or use `source: checkpoint` with `checkpoint: PATH`") from None
        return LoadedModel(model.eval(), arch=spec.name, arch_kwargs=kwargs, class_names=None)


@contextlib.contextmanager
def _hub_offline_unless_reachable():
    """Use only the local Hugging Face cache when the hub cannot be reached, instead of a minute of retries."""
    from huggingface_hub import constants

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        reachable = True
    except OSError:
        reachable = False
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not reachable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a plain ``torch.save``'d state dict; never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise BitsweepError(f"checkpoint {path} does not exist; check the `checkpoint:` path")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BitsweepError(f"checkpoint {path} holds more than tensors ({str(exc).splitlines()[0][:120]}); "
                            "bitsweep never unpickles code: re-save it with torch.save(model.state_dict(), path) "
                            "or as .safetensors") from None
    except Exception as exc:
        raise BitsweepError(f"checkpoint {path} is not readable by torch.load ({type(exc).__name__}); "
                            "save it with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BitsweepError(f"checkpoint {path} is not a state dict of tensors")
    return state


class Checkpoint(ModelSource):
    name = "checkpoint"
    description = "a timm architecture with weights from a local file (state dict or safetensors)"

    def load(self, spec, context):
        kwargs = _timm_kwargs(self.name, spec, {"checkpoint", "kwargs"})
        if "checkpoint" not in spec.options:
            raise BitsweepError(f"model {spec.id!r}: source checkpoint needs `checkpoint: PATH`")
        model = create_timm_model(spec.name, pretrained=False, **kwargs)
        state = read_state_dict(Path(spec.options["checkpoint"]).expanduser())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise BitsweepError(f"checkpoint {spec.options['checkpoint']} does not fit {spec.name} ({first[:160]}); "
                                "check the architecture name and `kwargs` such as num_classes") from None
        return LoadedModel(model.eval(), arch=spec.name, arch_kwargs=kwargs, class_names=None)


class Trained(ModelSource):
    name = "trained"
    description = "a timm architecture trained from scratch on the sweep's dataset (seeded, cached)"

    def load(self, spec, context):
        setting_fields = set(TrainingSettings.__dataclass_fields__)
        _timm_kwargs(self.name, spec, setting_fields | {"seed", "kwargs"})
        options = spec.options
        settings = TrainingSettings(**{k: v for k, v in options.items() if k in setting_fields})
        seed, model_kwargs = int(options.get("seed", 0)), dict(options.get("kwargs", {}))
        data = context.dataset.load("train", context.dataset_options)
        _, in_chans, size, _ = data.images.shape
        arch_kwargs = classifier_kwargs(spec.name, len(data.class_names), in_chans, size, **model_kwargs)
        key = training_key(spec.name, settings, seed, content_hash(data), model_kwargs)
        path = Path(context.cache_dir) / "trained" / f"{spec.name}-{key}.safetensors"
        if path.exists():
            model = create_timm_model(spec.name, pretrained=False, **arch_kwargs)
            model.load_state_dict(load_file(path), strict=True)
        else:
            model = train_classifier(spec.name, data, settings, seed, model_kwargs)
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        # timm's config still names the architecture's own input size; synthetic inputs read this one.
        model.pretrained_cfg = {**(model.pretrained_cfg or {}), "input_size": (in_chans, *data.images.shape[-2:])}
        return LoadedModel(model.eval(), arch=spec.name, arch_kwargs=arch_kwargs, class_names=data.class_names)


@bitsweep.hookimpl
def register_model_sources():
    return [Timm(), Checkpoint(), Trained()]
