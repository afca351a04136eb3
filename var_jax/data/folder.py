"""An image folder with one sub-folder per class (torchvision ImageFolder layout), as a grain source.

    root/
      class_a/xxx.jpg
      class_b/yyy.png

Classes are the sorted sub-folder names (label = position), files are sorted, and only files with an image
extension are listed (anything else is ignored). A file that cannot be decoded is skipped: the next readable
index is served in its place (deterministically), the file is counted in `num_unreadable` and logged once as a
warning, so one bad file never stops a run. With grain worker processes each worker keeps its own counts; the
record's `skipped_images` flag (1 on a replaced example) is what reaches the trainer's metrics.
"""
from __future__ import annotations

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


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 (H, W, 3); raises on unreadable or truncated files."""
    with user_path(path).open("rb") as f, Image.open(f) as image:
        image.load()   # force the full decode here, so truncation fails now and not inside the transform
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label), ...]) of an ImageFolder tree; clear errors for missing or empty trees."""
    root = user_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders")
    samples = []
    for label, name in enumerate(classes):
        samples.extend((path, label) for path in _image_files(root / name))
    if not samples:
        raise ValueError(f"image folder {str(root)!r} has no image files (extensions {IMAGE_EXTENSIONS})")
    return classes, samples


def _image_files(directory) -> list[str]:
    """Image files under `directory`, sorted; local trees follow symbolic links (as torchvision does)."""
    if is_local(directory):
        return [os.path.join(dirpath, f) for dirpath, _, filenames in sorted(os.walk(directory, followlinks=True))
                for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(str(p) for p in directory.rglob("*") if p.name.lower().endswith(IMAGE_EXTENSIONS))


class ImageFolderSource:
    """Random-access source of {'image': uint8 (H, W, 3), 'label': int32}; unreadable files are skipped."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.classes, self.samples = list_image_folder(root)
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
        return f"ImageFolderSource({self.root!r}, classes={self.num_classes}, len={len(self)})"
