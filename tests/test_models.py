"""Model sources: timm names and globs, local checkpoints (never unpickled), trained-and-cached models."""

import pickle

import pytest
import timm
import torch
from conftest import Payload
from safetensors.torch import save_file

from bitsweep.errors import BitsweepError
from bitsweep.models import LoadContext, ModelSpec, weights_hash
from bitsweep.registry import get_registry


def source(name):
    return get_registry().get("model source", name)


def test_timm_names_and_globs():
    assert [s.name for s in source("timm").expand(ModelSpec(name="resnet1[04]t"))] == ["resnet10t", "resnet14t"]
    with pytest.raises(BitsweepError, match="unknown timm model 'resnet19'; did you mean resnet"):
        source("timm").expand(ModelSpec(name="resnet19"))
    with pytest.raises(BitsweepError, match="matches no timm model"):
        source("timm").expand(ModelSpec(name="nonexistent*"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_loads_the_exact_weights(tmp_path, suffix):
    model = timm.create_model("resnet18", num_classes=7).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        save_file(model.state_dict(), path)
    spec = ModelSpec(name="resnet18", source="checkpoint", checkpoint=str(path), kwargs={"num_classes": 7})
    loaded = source("checkpoint").load(spec, None)
    assert weights_hash(loaded.module) == weights_hash(model)
    assert loaded.arch == "resnet18" and loaded.arch_kwargs == {"num_classes": 7}


def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    mark = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Payload(str(mark))}))
    spec = ModelSpec(name="resnet18", source="checkpoint", checkpoint=str(path))
    with pytest.raises(BitsweepError, match="holds more than tensors.*never unpickles code"):
        source("checkpoint").load(spec, None)
    assert not mark.exists()


def test_checkpoint_errors(tmp_path):
    with pytest.raises(BitsweepError, match="needs `checkpoint: PATH`"):
        source("checkpoint").load(ModelSpec(name="resnet18", source="checkpoint"), None)
    missing = ModelSpec(name="resnet18", source="checkpoint", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(BitsweepError, match="does not exist"):
        source("checkpoint").load(missing, None)
    path = tmp_path / "r10.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    wrong = ModelSpec(name="resnet18", source="checkpoint", checkpoint=str(path))
    with pytest.raises(BitsweepError, match="does not fit resnet18"):
        source("checkpoint").load(wrong, None)
    with pytest.raises(BitsweepError, match="unknown option"):
        source("checkpoint").load(ModelSpec(name="resnet18", source="checkpoint", checkpoint="x", epochs=3), None)


def test_trained_models_are_cached_by_content(tmp_path):
    dataset = get_registry().get("dataset", "synthetic")
    context = LoadContext(dataset=dataset, dataset_options={"n": 128}, cache_dir=tmp_path)
    spec = ModelSpec(name="test_efficientnet", source="trained", epochs=1, batch_size=32)
    first = source("trained").load(spec, context)
    cached = list((tmp_path / "trained").glob("test_efficientnet-*.safetensors"))
    assert len(cached) == 1
    again = source("trained").load(spec, context)
    assert weights_hash(again.module) == weights_hash(first.module)
    assert list((tmp_path / "trained").iterdir()) == cached, "a second load trains nothing new"
    assert again.arch_kwargs == {"num_classes": 4, "in_chans": 1} and again.class_names == first.class_names
    # Data-free steps synthesise inputs of the size it was trained on (16 x 16 here), not timm's 224.
    from bitsweep.synthetic import input_size

    assert input_size(first.module) == input_size(again.module) == (1, 16, 16)
    other = source("trained").load(ModelSpec(name="test_efficientnet", source="trained", epochs=1, batch_size=32, seed=1), context)
    assert weights_hash(other.module) != weights_hash(first.module)
