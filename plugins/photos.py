"""Dataset ``photos``: real photographs that ship inside scikit-image, for label-free checks.

No ImageNet images can be fetched offline, but a quantized ImageNet model can
still be compared with its fp32 self (top-1 agreement, KL) on natural inputs:
these photos, each seen through several deterministic crops and mirrorings (split
``test``). Split ``train`` holds other photos of the same wheel, for calibration:
none of them is an evaluation photo or a crop of one.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

import bitsweep
from bitsweep.datasets import Dataset, ImageSet
from bitsweep.errors import BitsweepError
from bitsweep.plugins.datasets import check_options, check_split, positive_int
from bitsweep.plugins.imagefolder import preprocess

# skimage.data functions whose files are inside the scikit-image wheel (no download); grey ones become RGB.
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
          "moon", "rocket")
# The calibration photos (skimage's ``cat`` is ``chelsea`` again, so it is not one of them).
CALIBRATION_PHOTOS = {"motorcycle_left": lambda data: data.stereo_motorcycle()[0],
                      "motorcycle_right": lambda data: data.stereo_motorcycle()[1],
                      **{name: lambda data, name=name: getattr(data, name)()
                         for name in ("immunohistochemistry", "retina", "clock", "cell", "page", "text")}}
DEFAULT_VIEWS = 8


def views_of(photo: Image.Image, count: int) -> list[Image.Image]:
    """The whole photo, then fixed-seed crops of 50-100 % of each side, every other one mirrored."""
    width, height = photo.size
    rng = np.random.default_rng(0)  # the same boxes for every photo and every run
    views = [photo]
    for k in range(1, count):
        side = rng.uniform(0.5, 1.0)
        left, top = rng.uniform(0.0, 1.0 - side, size=2)
        view = photo.crop((round(left * width), round(top * height),
                           round((left + side) * width), round((top + side) * height)))
        views.append(ImageOps.mirror(view) if k % 2 else view)
    return views


def _skimage_data():
    try:
        from skimage import data
    except ImportError as exc:
        raise BitsweepError("dataset 'photos' needs scikit-image's sample photos; "
                            "run `pip install scikit-image`") from exc
    return data


def load_photos(split: str = "test") -> list[Image.Image]:
    """The evaluation photos (``test``) or the calibration photos (``train``), as RGB."""
    data = _skimage_data()
    arrays = [getattr(data, name)() for name in PHOTOS] if split == "test" else \
        [read(data) for read in CALIBRATION_PHOTOS.values()]
    return [Image.fromarray(array).convert("RGB") for array in arrays]


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's class names (the first synonym of each), which models judged on these photos predict."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]


class Photos(Dataset):
    name = "photos"
    description = (f"{len(PHOTOS)} unlabelled photos from scikit-image x {DEFAULT_VIEWS} crops (option views:), "
                   f"for agreement with fp32 only; split train: {len(CALIBRATION_PHOTOS)} other photos, "
                   "for calibration")

    def check(self, options: dict) -> None:
        self._views(options)
        _skimage_data()

    def _views(self, options: dict) -> int:
        check_options(self.name, options, {"views"})
        return positive_int(self.name, "views", options.get("views", DEFAULT_VIEWS))

    def load(self, split: str, options: dict, data_config: dict | None = None) -> ImageSet:
        count = self._views(options)
        check_split(self.name, split)
        views = [view for photo in load_photos(split) for view in views_of(photo, count)]
        return ImageSet(preprocess(views, data_config), labels=None, class_names=imagenet_class_names())


@bitsweep.hookimpl
def register_datasets():
    return [Photos()]
