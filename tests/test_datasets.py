"""Datasets and training: the real Fashion-MNIST files, clear errors on bad data, bitwise-reproducible training."""

import gzip
import shutil

import pluggy
import pytest
import timm
import torch

import bitsweep.plugins.datasets as builtin_datasets
from bitsweep import hookspecs
from bitsweep.datasets import ImageSet, content_hash
from bitsweep.errors import BitsweepError
from bitsweep.plugins.datasets import FASHION_MNIST_DIR, Digits, FashionMNIST, Synthetic
from bitsweep.evaluate import accuracy, predict
from bitsweep.train import TrainingSettings, classifier_kwargs, train_classifier

TINY = TrainingSettings(epochs=3, batch_size=32, lr=3e-3)


def test_builtins_register_through_the_public_hook():
    manager = pluggy.PluginManager("bitsweep")
    manager.add_hookspecs(hookspecs)
    manager.register(builtin_datasets)
    (datasets,) = manager.hook.register_datasets()
    assert [d.name for d in datasets] == ["fashion-mnist", "digits", "synthetic"]


def test_fashion_mnist_reads_the_official_debian_files():
    train, test = FashionMNIST().load("train", {}), FashionMNIST().load("test", {})
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    assert abs(train.images.mean()) < 1e-3 and abs(train.images.std() - 1) < 1e-3, "normalized by train statistics"
    first = FashionMNIST().load("test", {"limit": 5})
    assert torch.equal(first.images, test.images[:5]) and first.labels.tolist() == [9, 2, 1, 1, 6]


def _copy_split(dst, corrupt_labels):
    """The official test split in ``dst``, its labels file rewritten by ``corrupt_labels(raw) -> bytes``."""
    dst.mkdir()
    shutil.copy(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", dst)
    raw = gzip.decompress((FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (dst / "t10k-labels-idx1-ubyte.gz").write_bytes(corrupt_labels(raw))


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: gzip.compress(raw[:-100]), "truncated or corrupt"),
    (lambda raw: gzip.compress(raw)[:-50], "not a readable gzip file"),
    (lambda raw: gzip.compress(b"\0\0\x0d\x01" + raw[4:]), "bad magic number"),
])
def test_damaged_idx_file_is_a_clear_error(tmp_path, corrupt, message):
    _copy_split(tmp_path / "fm", corrupt)
    with pytest.raises(BitsweepError, match=message) as info:
        FashionMNIST().load("test", {"path": str(tmp_path / "fm")})
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value) and "\n" not in str(info.value)


def test_missing_data_names_the_path_and_the_install_command(tmp_path):
    with pytest.raises(BitsweepError, match="apt-get install dataset-fashion-mnist") as info:
        FashionMNIST().load("train", {"path": str(tmp_path)})
    assert str(tmp_path) in str(info.value) and "path:" in str(info.value)


@pytest.mark.parametrize("split, options, message", [
    ("validation", {}, "unknown split"),
    ("test", {"limt": 5}, "unknown option"),
    ("test", {"limit": 0}, "positive integer"),
])
def test_bad_options_are_clear_errors(split, options, message):
    with pytest.raises(BitsweepError, match=message):
        FashionMNIST().load(split, options)


def test_synthetic_is_deterministic_and_shaped_by_its_options():
    options = {"num_classes": 3, "size": 12, "n": 30, "channels": 2}
    a, b = Synthetic().load("train", options), Synthetic().load("train", options)
    assert a.images.shape == (30, 2, 12, 12) and a.class_names == ["class0", "class1", "class2"]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert content_hash(a) == content_hash(b)
    assert not torch.equal(a.images, Synthetic().load("test", options).images), "splits differ"
    assert content_hash(a) != content_hash(Synthetic().load("train", {**options, "seed": 1}))


def test_content_hash_sees_every_pixel():
    data = Synthetic().load("train", {})
    changed = ImageSet(data.images.clone(), data.labels, data.class_names)
    changed.images[-1, 0, -1, -1] += 1e-6
    assert content_hash(changed) != content_hash(data)
    assert content_hash(ImageSet(data.images, None, data.class_names)) != content_hash(data)


def test_training_is_bitwise_reproducible_and_leaves_the_global_rng_alone():
    data = Synthetic().load("train", {"n": 128})
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    runs = [train_classifier("test_resnet", data, TrainingSettings(epochs=1, batch_size=32), seed=7) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), before)
    first, second = (run.state_dict() for run in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed must give identical weights"
    other = train_classifier("test_resnet", data, TrainingSettings(epochs=1, batch_size=32), seed=8).state_dict()
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_tiny_model_beats_chance_clearly():
    options = {"num_classes": 4, "n": 512}
    model = train_classifier("test_resnet", Synthetic().load("train", options), TINY, seed=0)
    assert not model.training
    test = Synthetic().load("test", options)
    assert accuracy(predict(model, test.images, 256)[0], test.labels)["top1"] > 80, "chance is 25 %"


def test_vit_is_built_for_small_images():
    kwargs = classifier_kwargs("test_vit", num_classes=10, in_chans=1, image_size=28, patch_size=4)
    assert kwargs == {"img_size": 28, "patch_size": 4, "num_classes": 10, "in_chans": 1}
    assert timm.create_model("test_vit", **kwargs)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert "img_size" not in classifier_kwargs("resnet10t", 10, 1, 28), "CNNs take any input size"
    with pytest.raises(BitsweepError, match="unknown timm architecture"):
        classifier_kwargs("resnet_that_does_not_exist", 10, 1, 28)


def test_digits_are_scikit_learns_images_split_one_in_five():
    from sklearn.datasets import load_digits

    original = load_digits()
    train = Digits().load("train", {"size": 8})
    test = Digits().load("test", {"size": 8})
    assert (len(train.labels), len(test.labels)) == (1437, 360)
    assert torch.equal(test.labels, torch.from_numpy(original.target[::5]).long())
    assert torch.equal(torch.cat([train.labels, test.labels]).sort().values,
                       torch.from_numpy(original.target).long().sort().values)
    # At 8x8 the pixels are the originals, standardised with the training images' mean and std.
    pixels = torch.from_numpy(original.images[::5]).float() / 16
    rest = torch.from_numpy(original.images).float()[torch.arange(1797) % 5 != 0] / 16
    torch.testing.assert_close(test.images[:, 0], (pixels - rest.mean()) / rest.std())
    assert Digits().load("test", {"limit": 7}).images.shape == (7, 1, 32, 32)
    with pytest.raises(BitsweepError, match="dataset 'digits': option size must be a positive integer, got 0"):
        Digits().load("test", {"size": 0})
