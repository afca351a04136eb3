"""The embedded default dataset: scikit-learn's bundled handwritten digits, upscaled to RGB images.

1,797 real 8×8 scans (values 0..16, 10 classes; Alpaydin & Kaynak, UCI "optdigits"), shipped inside
scikit-learn, so a run needs no download. Ink is bright on a dark background (value 16 -> 255), upscaled with
bicubic interpolation to `resolution` px and repeated over 3 channels.

The train/test split is fixed (stratified, seeded) so that the generator's data and the digits classifier's
held-out set agree everywhere.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
NATIVE_SIZE = 8
MAX_VALUE = 16           # load_digits pixel values are counts of set pixels in 4×4 blocks: 0..16
TEST_FRACTION = 0.2      # held-out share for the classifier's accuracy
SPLIT_SEED = 0
SPLITS = ("all", "train", "test")


@functools.lru_cache(maxsize=None)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def split_indices(split: str) -> np.ndarray:
    """Indices of `split` into the 1,797 digits; 'train' and 'test' are disjoint and stratified by class."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    _, labels = _load_digits()
    all_indices = np.arange(len(labels))
    if split == "all":
        return all_indices
    train, test = train_test_split(all_indices, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                   stratify=labels)
    return np.sort(train if split == "train" else test)


def native_digits(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The original scans: float32 (N, 8, 8) in 0..16 and int32 labels (N,)."""
    images, labels = _load_digits()
    indices = split_indices(split)
    return images[indices], labels[indices]


def upscale_digit(digit: np.ndarray, resolution: int) -> np.ndarray:
    """One 8×8 digit in 0..16 -> uint8 (resolution, resolution, 3), ink bright, bicubic, clipped to [0, 255]."""
    scaled = Image.fromarray(np.asarray(digit, np.float32) * np.float32(255.0 / MAX_VALUE))
    big = np.asarray(scaled.resize((resolution, resolution), Image.Resampling.BICUBIC))
    gray = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


@functools.lru_cache(maxsize=4)
def _rendered(resolution: int) -> np.ndarray:
    images, _ = _load_digits()
    return np.stack([upscale_digit(d, resolution) for d in images])


class DigitsSource:
    """Random-access source of {'image': uint8 (R, R, 3), 'label': int32} for grain."""

    num_classes = NUM_CLASSES

    def __init__(self, resolution: int = 32, split: str = "all"):
        if resolution < NATIVE_SIZE:
            raise ValueError(f"digits resolution must be at least {NATIVE_SIZE}, got {resolution}")
        self.resolution = int(resolution)
        self.split = split
        self._indices = split_indices(split)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict:
        original = int(self._indices[index])
        return {"image": _rendered(self.resolution)[original], "label": _load_digits()[1][original]}

    def __repr__(self) -> str:
        return f"DigitsSource(resolution={self.resolution}, split={self.split!r}, len={len(self)})"
