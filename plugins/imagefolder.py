"""Dataset ``imagefolder``: a user's own labelled images (e.g. ImageNet val), one sub-folder per class.

Images go through the evaluated model's own timm eval transform (resize, centre
crop, normalisation), so the accuracy measured is the one its model card quotes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import timm.data
import torch
from PIL import Image, UnidentifiedImageError

import bitsweep
from bitsweep.datasets import Dataset, ImageSet
from bitsweep.errors import BitsweepError
from bitsweep.plugins.datasets import check_options, check_split, positive_int

LAYOUT = "expected ROOT/<class folder>/<images> (e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG)"


def preprocess(images: Iterable[Image.Image], data_config: dict | None) -> torch.Tensor:
    """timm's eval transform for a model's data config (timm's ImageNet defaults at 224 without one).

    Resize and crop run per image in PIL; scaling and normalisation run once on the uint8 batch, as
    timm's prefetcher does: the same values as the per-image transform, but one tensor op instead of
    two per image (tiny torch ops cost ~10x more when the cores are busy) and no float copy per image.
    """
    config = data_config or timm.data.resolve_data_config({"input_size": (3, 224, 224)})
    transform = timm.data.create_transform(**config, use_prefetcher=True)  # ends with a uint8 tensor
    batch = torch.stack([transform(image) for image in images]).float().div_(255)
    mean, std = (torch.tensor(config[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    return batch.sub_(mean).div_(std)


def read_class_index(path: Path) -> dict[str, int]:
    """A JSON object mapping folder name -> class index, covering 0..N-1 once each (ImageNet's 1000-class order)."""
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BitsweepError(f"dataset 'imagefolder': cannot read class_index {path} ({exc}); it must be a JSON "
                            'object mapping folder name to class index, e.g. {"n01440764": 0, ...}') from exc
    indices = sorted(mapping.values()) if isinstance(mapping, dict) else None
    if indices is None or not all(type(i) is int for i in indices) or indices != list(range(len(indices))):
        raise BitsweepError(f"dataset 'imagefolder': class_index {path} must map each folder name to a distinct "
                            'integer 0..N-1, e.g. {"n01440764": 0, "n01443537": 1, ...}')
    return mapping


def list_images(root: Path, class_index: dict[str, int] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) pairs, round-robin over classes so that any prefix covers as many classes as it can."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if class_index is None:
        class_index = {folder.name: i for i, folder in enumerate(folders)}
    unknown = [folder.name for folder in folders if folder.name not in class_index]
    if unknown:
        raise BitsweepError(f"dataset 'imagefolder': class_index has no entry for folder(s) "
                            f"{', '.join(unknown[:5])} in {root}; add them or remove those folders")
    extensions = timm.data.get_img_extensions(as_set=True)
    per_class = [sorted(f for f in folder.iterdir() if f.suffix.lower() in extensions) for folder in folders]
    if not any(per_class):
        raise BitsweepError(f"dataset 'imagefolder': no images ({', '.join(sorted(extensions))}) in {root}; {LAYOUT}")
    longest = max(len(files) for files in per_class)
    pairs = [(files[rank], class_index[folder.name]) for rank in range(longest)
             for folder, files in zip(folders, per_class, strict=True) if rank < len(files)]
    return pairs, sorted(class_index, key=class_index.get)


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise BitsweepError(f"cannot read image {path} ({exc}); remove or replace the file") from exc


class ImageFolder(Dataset):
    name = "imagefolder"
    description = "your labelled images, ImageNet-style ROOT/<class>/<image> (option path:), model's timm transforms"

    def check(self, options: dict) -> None:
        self._root(options)

    def _root(self, options: dict) -> Path:
        check_options(self.name, options, {"path", "class_index", "limit"})
        if "path" not in options:
            raise BitsweepError(f"dataset {self.name!r} needs the option path: pointing at a folder; {LAYOUT}")
        root = Path(options["path"]).expanduser()
        if not root.is_dir():
            raise BitsweepError(f"dataset {self.name!r}: path {root} is not a directory; {LAYOUT}")
        return root

    def load(self, split: str, options: dict, data_config: dict | None = None) -> ImageSet:
        check_split(self.name, split)
        root = self._root(options)
        if split == "train":
            root = root / "train"
            if not root.is_dir():
                raise BitsweepError(f"dataset {self.name!r}: no training images, {root} does not exist; "
                                    "put them there with the same layout as the test images")
        elif (root / "val").is_dir():
            root = root / "val"
        class_index = read_class_index(Path(options["class_index"]).expanduser()) if "class_index" in options else None
        pairs, class_names = list_images(root, class_index)
        if "limit" in options:
            pairs = pairs[:positive_int(self.name, "limit", options["limit"])]
        images = preprocess((load_image(path) for path, _ in pairs), data_config)
        labels = torch.tensor([label for _, label in pairs], dtype=torch.int64)
        return ImageSet(images, labels, class_names)


@bitsweep.hookimpl
def register_datasets():
    return [ImageFolder()]
