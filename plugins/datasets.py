"""Built-in datasets: Fashion-MNIST from Debian's package and scikit-learn's digits (real labelled images
offline), and a synthetic set for tests."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bitsweep
from bitsweep.datasets import SPLITS, Dataset, ImageSet
from bitsweep.errors import BitsweepError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_SUPERCLASSES = {"tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
                              "footwear": ["Sandal", "Sneaker", "Ankle boot"],
                              "trouser": ["Trouser"], "dress": ["Dress"], "bag": ["Bag"]}
# Pixel mean and std of the 60k training images (in [0, 1]), measured once on the official files.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860406, 0.3530242
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}
_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one the MNIST family uses


def check_options(dataset: str, options: dict, allowed: set[str]) -> None:
    """One line naming any option of ``dataset`` outside ``allowed``."""
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BitsweepError(f"dataset {dataset!r}: unknown option(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(allowed))}")


def check_split(dataset: str, split: str) -> None:
    """One line when ``split`` is not a split datasets offer."""
    if split not in SPLITS:
        raise BitsweepError(f"dataset {dataset!r}: unknown split {split!r}; use one of {', '.join(SPLITS)}")


def positive_int(dataset: str, key: str, value) -> int:
    """``value`` of option ``key``, or one line saying it must be a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BitsweepError(f"dataset {dataset!r}: option {key} must be a positive integer, got {value!r}")
    return value


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one gzipped IDX file of unsigned bytes, checking the header against the payload size."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise BitsweepError(f"{path} is not a readable gzip file ({exc}); "
                            "reinstall it with `apt-get install --reinstall dataset-fashion-mnist`") from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise BitsweepError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (bad magic number); "
                            "reinstall it with `apt-get install --reinstall dataset-fashion-mnist`")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise BitsweepError(f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
                            f"file holds {len(raw)} bytes; reinstall it with "
                            "`apt-get install --reinstall dataset-fashion-mnist`")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


class FashionMNIST(Dataset):
    name = "fashion-mnist"
    description = "Zalando Fashion-MNIST, 28x28 grey, 10 classes, 60k/10k (Debian package dataset-fashion-mnist)"

    def check(self, options: dict) -> None:
        self._root(options, "test")

    def _root(self, options: dict, split: str) -> Path:
        """The folder holding ``split``'s two IDX files, or one error saying how to get them."""
        check_options(self.name, options, {"path", "limit"})
        check_split(self.name, split)
        root = Path(options.get("path", FASHION_MNIST_DIR)).expanduser()
        images_file, labels_file, _ = _FILES[split]
        missing = [name for name in (images_file, labels_file) if not (root / name).is_file()]
        if missing:
            raise BitsweepError(f"Fashion-MNIST not found at {root} (missing {', '.join(missing)}); install it with "
                                "`apt-get install dataset-fashion-mnist` or set the dataset option `path:` "
                                "to a directory holding the IDX .gz files")
        return root

    def load(self, split: str, options: dict, data_config: dict | None = None) -> ImageSet:
        root = self._root(options, split)
        images_file, labels_file, count = _FILES[split]
        pixels = read_idx(root / images_file, ndim=3)
        labels = read_idx(root / labels_file, ndim=1)
        if pixels.shape[1:] != (28, 28) or len(pixels) != len(labels) or len(labels) != count:
            raise BitsweepError(f"Fashion-MNIST {split} files in {root} hold {pixels.shape} images and "
                                f"{len(labels)} labels, expected ({count}, 28, 28) and {count}")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise BitsweepError(f"{root / labels_file} has label {labels.max()}, expected 0..9; the file is corrupt")
        if "limit" in options:
            n = positive_int(self.name, "limit", options["limit"])
            pixels, labels = pixels[:n], labels[:n]
        images = torch.from_numpy(pixels.copy()).unsqueeze(1).float().div_(255)
        images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), list(FASHION_MNIST_CLASSES),
                        FASHION_MNIST_SUPERCLASSES)


def _sklearn_digits():
    """scikit-learn's digits (images and targets), or one error saying how to get scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BitsweepError("dataset 'digits' needs scikit-learn; install it with `pip install scikit-learn`") from None
    return load_digits()


class Digits(Dataset):
    """scikit-learn's copy of the UCI handwritten digits (1797 images, 8x8, 17 grey levels), shipped in its wheel:
    a second real labelled set that needs no download. Every fifth image is a test image."""

    name = "digits"
    description = "handwritten digits 0-9 from scikit-learn (UCI), 8x8 grey upscaled to `size` (32), 1437/360 split"

    allowed_options = {"size", "limit"}

    def check(self, options: dict) -> None:
        check_options(self.name, options, self.allowed_options)
        _sklearn_digits()

    def load(self, split: str, options: dict, data_config: dict | None = None) -> ImageSet:
        check_options(self.name, options, self.allowed_options)
        check_split(self.name, split)
        size = positive_int(self.name, "size", options.get("size", 32))
        digits = _sklearn_digits()
        pixels = torch.from_numpy(digits.images).float().div_(16).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        test = torch.arange(len(labels)) % 5 == 0
        train_pixels = pixels[~test]
        chosen = test if split == "test" else ~test
        pixels, labels = pixels[chosen], labels[chosen]
        if "limit" in options:
            n = positive_int(self.name, "limit", options["limit"])
            pixels, labels = pixels[:n], labels[:n]
        images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        images = images.sub_(train_pixels.mean()).div_(train_pixels.std())  # the training images' statistics
        return ImageSet(images, labels, [str(digit) for digit in range(10)])


class Synthetic(Dataset):
    """Per-class smooth random prototypes plus noise: learnable in seconds, for tests only."""

    name = "synthetic"
    description = "deterministic synthetic images (smooth class prototypes + noise), for tests"
    defaults = {"num_classes": 4, "size": 16, "n": 256, "channels": 1, "seed": 0}

    def check(self, options: dict) -> None:
        check_options(self.name, options, set(self.defaults))

    def load(self, split: str, options: dict, data_config: dict | None = None) -> ImageSet:
        self.check(options)
        check_split(self.name, split)
        opts = {**self.defaults, **options}
        classes, size, n, channels = (positive_int(self.name, key, opts[key])
                                      for key in ("num_classes", "size", "n", "channels"))
        seed = int(opts["seed"])
        # Prototypes depend on the seed only, so train and test share classes; the noise also on the split.
        gen = torch.Generator().manual_seed(seed)
        coarse = torch.randn(classes, channels, 4, 4, generator=gen)
        split_seeds = torch.randint(2**31, (len(SPLITS),), generator=gen)
        prototypes = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        gen = torch.Generator().manual_seed(int(split_seeds[SPLITS.index(split)]))
        labels = torch.randperm(n, generator=gen) % classes
        images = prototypes[labels] + 0.5 * torch.randn(n, channels, size, size, generator=gen)
        return ImageSet(images, labels, [f"class{i}" for i in range(classes)])


@bitsweep.hookimpl
def register_datasets():
    return [FashionMNIST(), Digits(), Synthetic()]
