"""An image folder with one sub-folder per class (torchvision ImageFolder layout), as a grain source.

    root/
      class_a/xxx.jpg
      class_b/yyy.png

Classes are the sorted sub-folder names (label = position), files are sorted, and only files with an image
extension are listed (anything else is ignored). A file that cannot be decoded is skipped: the next readable
index is served in its place (deterministically), the file is counted in `num_unreadable` and logged once as a
warning, so one bad file never stops a run. With grain worker processes each worker keeps its own counts; the
record's `skipped_images` flag (1 on a replaced example) is what reaches the trainer's metrics.

Held-out split (`split='val'`): a `val/` folder beside the root when the root is a folder named `train/` (the
ImageNet layout; its classes are matched to the training classes by name), else the files whose relative path
hashes into the first HELD_OUT_FRACTION of the hash range; `split='train'` then leaves those files out, so they
are never trained on. The hash depends on the path inside the root only: the split does not change when the tree
is moved or files are added elsewhere. `split='all'` lists every file of the root.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
from PIL import Image

from var_jax.paths import is_local, user_path

log = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS, which the reference's ImageFolder uses
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# How many following indices to try before giving up: a folder that bad is a broken dataset, not a bad file.
MAX_SUBSTITUTIONS = 64
SPLITS = ("all", "train", "val")
HELD_OUT_FRACTION = 0.02         # of the files, when there is no val/ folder beside train/


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 (H, W, 3); raises on unreadable or truncated files."""
    with user_path(path).open("rb") as f, Image.open(f) as image:
        image.load()   # force the full decode here, so truncation fails now and not inside the transform
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def list_image_folder(root: str | os.PathLike, classes: list[str] | None = None
                      ) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label), ...]) of an ImageFolder tree; clear errors for missing or empty trees.

    `classes`: label by these names (a held-out folder beside the training one); a sub-folder not among them is
    an error."""
    root = user_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    found = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not found:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"image folder {str(root)!r} has class folders the training folder lacks: {unknown[:5]}")
    samples = []
    for name in found:
        samples.extend((path, classes.index(name)) for path in _image_files(root / name))
    if not samples:
        raise ValueError(f"image folder {str(root)!r} has no image files (extensions {IMAGE_EXTENSIONS})")
    return classes, samples


def held_out_folder(root: str | os.PathLike):
    """ROOT/../val when ROOT is a folder named train/ with a val/ folder beside it, else None."""
    root = user_path(root)
    sibling = root.parent / "val"
    return sibling if root.name == "train" and sibling.is_dir() else None


def in_held_out_fraction(relative_path: str) -> bool:
    """Whether a file (its path inside the root, '/'-separated) belongs to the hashed held-out fraction."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < HELD_OUT_FRACTION * 2 ** 64


def _image_files(directory) -> list[str]:
    """Image files under `directory`, sorted; local trees follow symbolic links (as torchvision does)."""
    if is_local(directory):
        return [os.path.join(dirpath, f) for dirpath, _, filenames in sorted(os.walk(directory, followlinks=True))
                for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(str(p) for p in directory.rglob("*") if p.name.lower().endswith(IMAGE_EXTENSIONS))


class ImageFolderSource:
    """Random-access source of {'image': uint8 (H, W, 3), 'label': int32}; unreadable files are skipped.

    split: 'all' (every file of the root), 'train' (without the held-out files) or 'val' (the held-out files);
    see the module docstring."""

    def __init__(self, root: str | os.PathLike, split: str = "all"):
        if split not in SPLITS:
            raise ValueError(f"folder split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = str(root), split
        self.classes, self.samples = list_image_folder(root)
        val_folder = held_out_folder(root) if split != "all" else None
        if val_folder is not None and split == "val":
            self.samples = list_image_folder(val_folder, self.classes)[1]
        elif val_folder is None and split != "all":
            # listed paths start with the absolute root (list_image_folder): the rest is the path inside it
            prefix, total = len(str(user_path(root))), len(self.samples)
            self.samples = [s for s in self.samples
                            if in_held_out_fraction(s[0][prefix:].replace(os.sep, "/").lstrip("/")) == (split == "val")]
            if not self.samples:
                raise ValueError(f"image folder {self.root!r} has no {split!r} files (held-out fraction "
                                 f"{HELD_OUT_FRACTION} of {total} files)")
        self.num_classes = len(self.classes)
        self.unreadable: set[str] = set()
        self.num_substitutions = 0

    @property
    def num_unreadable(self) -> int:
        return len(self.unreadable)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        for attempt in range(MAX_SUBSTITUTIONS + 1):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = decode_rgb(path)
            except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this file"
                if path not in self.unreadable:
                    self.unreadable.add(path)
                    log.warning("skipping unreadable image %s (%s: %s); %d unreadable so far",
                                path, type(error).__name__, error, len(self.unreadable))
                continue
            if attempt:
                self.num_substitutions += 1
            # Counted in the example (1 when the file at `index` was unreadable, so a bad file counts once per
            # epoch): worker processes' own counters never reach the trainer, the batch does.
            return {"image": image, "label": np.int32(label), "skipped_images": np.int32(attempt > 0)}
        raise RuntimeError(f"image folder {self.root!r}: {MAX_SUBSTITUTIONS + 1} consecutive files from index "
                           f"{index} are unreadable; the dataset is broken")

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, split={self.split!r}, classes={self.num_classes}, len={len(self)})"
