"""The sweep's per-model analyses, beside its cells: class clusters (from the classifier's weights and
from fp32's confusions) and per-layer sensitivity (the accuracy lost when one layer alone is quantized).
Each is redone only when its settings in flows.yaml change."""

from __future__ import annotations

import copy
import json

import torch

from bitsweep.cells import ModelRecord
from bitsweep.cluster import cluster_classes, confusion_distances, confusion_matrix, weight_distances
from bitsweep.config import Sweep
from bitsweep.errors import BitsweepError
from bitsweep.evaluate import accuracy, fidelity, predict
from bitsweep.files import write_json
from bitsweep.loaded import eval_data, fp32_logits, fp32_module
from bitsweep.policy import quantizable_layers
from bitsweep.schemes import quantize_tensor
from bitsweep.tracing import uses_models


@uses_models
def cluster_model(sweep: Sweep, record: ModelRecord) -> dict:
    """The cluster step: class hierarchies from the classifier's weights and from fp32's confusions.

    Cells need not be rerun when the settings change: super-class scores are computed from their stored
    logits when results are written.
    """
    path = record.dir / "clusters.json"
    settings = sweep.clustering.model_dump()
    if path.exists() and json.loads(path.read_text())["settings"] == settings:
        return {"clusters": str(path)}
    saved = fp32_logits(record)
    logits, labels = saved["logits"], saved.get("labels")
    classes = logits.shape[1]
    k = None if settings["k"] == "auto" else settings["k"]
    views = {}
    module = fp32_module(record)
    weight = getattr(module.get_classifier(), "weight", None)
    data = eval_data(sweep, module)
    if weight is not None and weight.shape[0] == classes:
        views["weights"] = cluster_classes(weight_distances(weight.detach().reshape(classes, -1).numpy()), k)
    if labels is not None:
        views["confusion"] = cluster_classes(confusion_distances(confusion_matrix(logits.argmax(1), labels, classes)),
                                             k)
    source = settings["source"]
    if source == "auto":  # confusion on labelled data, else weights, else (no classifier matrix) none
        source = next((view for view in ("confusion", "weights") if view in views), None)
    elif source not in views:
        why = "the dataset has no labels" if source == "confusion" else "the classifier has no weight matrix"
        raise BitsweepError(f"sweep {sweep.name!r}, model {record.model}: cannot cluster classes by {source} "
                            f"({why}); set clustering.source to "
                            f"{'weights' if source == 'confusion' else 'confusion'} in flows.yaml")
    natural = None
    if data.superclasses:
        names = list(data.superclasses)
        group_of = {cls: names.index(group) for group, members in data.superclasses.items() for cls in members}
        natural = {"names": names, "groups": [group_of[cls] for cls in data.class_names]}
    names = data.class_names if len(data.class_names) == classes else [str(i) for i in range(classes)]
    write_json(path, {"settings": settings, "source": source, "class_names": names, "natural": natural, **views})
    return {"clusters": str(path)}


@uses_models
def layer_sensitivity(sweep: Sweep, record: ModelRecord) -> dict:
    """Top-1 (or agreement with fp32) when only one layer is quantized, for every layer and width.

    Runs on the first ``sensitivity.images`` evaluation images.
    """
    settings = sweep.sensitivity.model_dump() | {"bits": sweep.bits, "granularity": sweep.granularity[0],
                                                 "group_size": sweep.group_size}
    path = record.dir / "sensitivity.json"
    if not settings["images"] or (path.exists() and json.loads(path.read_text())["settings"] == settings):
        return {"sensitivity": str(path) if path.exists() else None}
    module = copy.deepcopy(fp32_module(record))
    data = eval_data(sweep, module)
    images = data.images[:settings["images"]]
    reference = fp32_logits(record)["logits"][: len(images)]
    labels = None if data.labels is None else data.labels[: len(images)]
    metric = "top1" if labels is not None else "agreement"

    def score(logits):
        return accuracy(logits, labels)["top1"] if labels is not None else fidelity(logits, reference)["agreement"]

    base = score(reference)
    rows = []
    for scheme in sweep.sensitivity.schemes or sweep.schemes[:1]:
        for bits in sweep.bits:
            for name, layer in quantizable_layers(module):
                original = layer.weight.detach().clone()
                with torch.no_grad():
                    layer.weight.copy_(quantize_tensor(original, scheme, bits, settings["granularity"],
                                                       settings["group_size"]).dequantize())
                value = score(predict(module, images, sweep.evaluation.batch_size)[0])
                with torch.no_grad():
                    layer.weight.copy_(original)
                rows.append({"layer": name, "scheme": scheme, "bits": bits, metric: value, "drop": base - value})
    write_json(path, {"settings": settings, "metric": metric, "fp32": base, "rows": rows})
    return {"sensitivity": str(path)}
