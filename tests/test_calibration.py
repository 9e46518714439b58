"""Real calibration images: every data-free step reads them in place of synthetic inputs, and they are never
evaluation images."""

import copy
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import bitsweep
from bitsweep import synthetic
from bitsweep.allocate import output_sqnr
from bitsweep.calibration import calibrating, draw
from bitsweep.config import parse_config
from bitsweep.datasets import ImageSet
from bitsweep.errors import BitsweepError
from bitsweep.loaded import check_sweeps
from bitsweep.plugins.photos import CALIBRATION_PHOTOS, DEFAULT_VIEWS, Photos, load_photos
from bitsweep.recipes import correct_bias
from conftest import conv_bn_net, write_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSWEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "_INPUTS", synthetic.PerModelCache())  # nothing from other tests in memory
    return tmp_path


def real_images(count=12, seed=1):
    """Inputs for ``conv_bn_net`` unlike its synthetic ones: drawn from the distribution it was trained on."""
    return torch.randn((count, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def test_a_recipe_reads_the_calibration_images_and_synthesises_nothing(cache):
    model, images = conv_bn_net(), real_images()
    got = bitsweep.quantize_model(model, "asymmetric", 4, recipe="bias", calibration=images)
    expected = bitsweep.quantize_model(model, "asymmetric", 4)  # "bias": plain rounding, then DFQ's correction
    correct_bias(copy.deepcopy(model), expected, images)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name
    assert not (cache / "synthetic").exists()
    data_free = bitsweep.quantize_model(model, "asymmetric", 4, recipe="bias")
    assert any(not torch.equal(tensor, got.state_dict()[name]) for name, tensor in data_free.state_dict().items())


def test_the_allocator_measures_on_the_calibration_images(cache):
    model, images = conv_bn_net(), real_images()
    data_free = output_sqnr(model, "asymmetric", (3, 4))  # first, so a table keyed on the weights alone would win
    with calibrating(images):
        calibrated = output_sqnr(model, "asymmetric", (3, 4))
    assert calibrated == output_sqnr(model, "asymmetric", (3, 4), inputs=images) != data_free
    plan = bitsweep.quantize_model(model, "asymmetric", 4, policy={"allocate": True}, calibration=images)
    assert len(plan.quantized_layers) == 3


@pytest.mark.parametrize("images, message", [
    ([torch.zeros(2, 3, 32, 32)], "calibration images must be a float tensor .* not list"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), r"not \(2, 3, 32, 32\)"),
    (torch.zeros(0, 3, 32, 32), r"N >= 1, not \(0, 3, 32, 32\)"),
    (torch.full((2, 3, 32, 32), float("nan")), "calibration images hold NaN or infinite values"),
])
def test_bad_calibration_images_are_one_line(images, message):
    with pytest.raises(BitsweepError, match=message) as refused:
        bitsweep.quantize_model(conv_bn_net(), "asymmetric", 4, recipe="bias", calibration=images)
    assert "\n" not in str(refused.value)


def test_calibration_and_synthetic_settings_are_not_both_taken():
    with pytest.raises(BitsweepError, match="synthetic settings or calibration images, not both"):
        bitsweep.quantize_model(conv_bn_net(), "asymmetric", 4, recipe="bias", calibration=real_images(),
                                synthetic={"images": 4})


def sweep_config(**calibration_and_more):
    return {"sweeps": [{"name": "s", "models": ["resnet18"], "dataset": {"name": "synthetic"}, "schemes": ["pow2"],
                        "bits": [4], **calibration_and_more}]}


@pytest.mark.parametrize("changes, message", [
    ({"calibration": {"dataset": "synthetic", "split": "test"}},
     "sweeps[0]: calibration: synthetic split test is the data this sweep evaluates on; calibrate on split: train"),
    ({"calibration": {"dataset": "synthetic"}, "synthetic": {"steps": 5}},
     "sweeps[0]: calibration and synthetic each choose the data-free steps' images; keep one"),
    ({"calibration": {"dataset": "imagenet"}}, "sweeps[0].calibration.dataset.name: unknown dataset 'imagenet'; available: digits"),
    ({"calibration": {"dataset": "synthetic", "split": "val"}}, "sweeps[0].calibration.split: Input should be"),
    ({"calibration": {"dataset": "synthetic", "images": 0}}, "sweeps[0].calibration.images: Input should be greater"),
    ({"calibration": {"dataset": "synthetic", "image": 8}}, "sweeps[0].calibration.image: unknown key"),
])
def test_bad_calibration_entries_are_one_line(changes, message):
    with pytest.raises(BitsweepError) as refused:
        parse_config(sweep_config(**changes))
    assert str(refused.value).startswith(f"flows.yaml: {message}") and "\n" not in str(refused.value)


def test_a_calibration_set_is_drawn_seeded_and_never_from_the_evaluation_images():
    data = ImageSet(torch.arange(40.0).view(10, 1, 2, 2), None, [])
    drawn = draw(data, 4, "x split train")
    assert torch.equal(drawn, draw(data, 4, "x split train")) and not torch.equal(drawn, data.images[:4])
    assert all(any(torch.equal(image, row) for row in data.images) for image in drawn)
    with pytest.raises(BitsweepError, match=r"^calibration: x split train holds 10 images, fewer than the 11 asked"):
        draw(data, 11, "x split train")
    evaluation = ImageSet(torch.cat([torch.full((3, 1, 2, 2), -1.0), drawn[2:3]]), None, [])
    with pytest.raises(BitsweepError, match=r"^calibration: 1 of the 4 images drawn from x split train are also "
                                            r"evaluation images"):
        draw(data, 4, "x split train", evaluation)
    assert torch.equal(draw(data, 4, "x split train", ImageSet(evaluation.images[:3], None, [])), drawn)
    with pytest.raises(BitsweepError, match=r"^calibration: x split train holds images of \(1, 2, 2\), the evaluation "
                                            r"images are \(1, 3, 3\); calibrate on images of that size"):
        draw(data, 4, "x split train", ImageSet(torch.zeros(2, 1, 3, 3), None, []))


def write_tree(root, names):
    for name, colour in names.items():
        folder = root / "cls"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40, 3), colour, np.uint8)).save(folder / f"{name}.png")


def imagefolder_sweep(tmp_path, images=2):
    write_tree(tmp_path / "data" / "val", {"a": 10, "b": 200})
    write_tree(tmp_path / "data" / "train", {"c": 90, "b": 200})  # b is also an evaluation image
    dataset = {"name": "imagefolder", "path": str(tmp_path / "data")}
    config = sweep_config(dataset=dataset, calibration={"dataset": dataset, "images": images},
                          output=str(tmp_path / "run"))
    return parse_config(config).sweeps


def test_check_refuses_calibration_images_shared_with_the_evaluation_data(tmp_path):
    with pytest.raises(BitsweepError, match=r"^calibration: 1 of the 2 images drawn from imagefolder split train "
                                            r"are also evaluation images; calibrate on data") as refused:
        check_sweeps(imagefolder_sweep(tmp_path))
    assert "\n" not in str(refused.value)
    with pytest.raises(BitsweepError, match=r"^calibration: imagefolder split train holds 2 images, fewer than "
                                            r"the 3 asked for"):
        check_sweeps(imagefolder_sweep(tmp_path, images=3))
    missing = parse_config(sweep_config(calibration={"dataset": {"name": "imagefolder", "path": str(tmp_path / "no")}}))
    with pytest.raises(BitsweepError, match=r"^dataset 'imagefolder': path .*no is not a directory"):
        check_sweeps(missing.sweeps)


def test_the_photos_calibration_split_holds_other_photos():
    calibration, evaluation = load_photos("train"), load_photos("test")
    assert len(calibration) == len(CALIBRATION_PHOTOS) == 8
    evaluated = {np.asarray(photo).tobytes() for photo in evaluation}
    assert not any(np.asarray(photo).tobytes() in evaluated for photo in calibration)
    train, test = Photos().load("train", {}), Photos().load("test", {})
    assert train.labels is None and train.images.shape == (8 * DEFAULT_VIEWS, 3, 224, 224)
    assert draw(train, 64, "photos split train", test).shape == (64, 3, 224, 224)


@pytest.mark.slow
def test_a_sweep_with_calibration_images_reads_them_and_a_bad_one_writes_nothing(tmp_path, run_cli):
    config = write_config(tmp_path, schemes=("asymmetric",), bits=(4,))
    data = yaml.safe_load(config.read_text())
    sweep = data["sweeps"][0]
    sweep |= {"recipes": ["none", "bias"], "policies": ["full"],
              "calibration": {"dataset": sweep["dataset"], "images": 300}}  # the split holds 256
    config.write_text(yaml.safe_dump(data))
    env = {"BITSWEEP_CACHE": str(tmp_path / "cache")}
    refused = run_cli("run", "--config", str(config), env=env)
    assert refused.returncode != 0 and not (tmp_path / "run").exists()
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "calibration: synthetic split train holds 256 images, fewer than the 300 asked for; lower calibration "
        "images: or calibrate on a larger split")
    sweep["calibration"]["images"] = 32
    config.write_text(yaml.safe_dump(data))
    done = run_cli("run", "--config", str(config), env=env)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "cache" / "synthetic").exists()  # nothing synthesised: the recipe read real images
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["recipe"], r.get("calibration"), r["status"]) for r in rows] == [
        ("", None, "ok"), ("none", "", "ok"), ("bias", "synthetic train 32", "ok")]
