"""The reference image transforms (VAR_REFERENCE.md §4), on PIL images and numpy arrays.

Training: shorter side to round(1.125·R) with LANCZOS, random R×R crop, optional horizontal flip (off by
default, as in the reference). Evaluation: the same resize, then the centre R×R crop. Models see float32 NHWC
in [-1, 1] (x·2−1 of x in [0, 1]).

The pipeline's batches stay uint8 up to the devices (4× fewer bytes to move than float32): the jitted steps call
`to_model_range_on_device`, which gives exactly `to_model_range`'s numbers.

The size and crop arithmetic follows torchvision's `Resize(int)`, `CenterCrop` and `RandomCrop`, which the
reference uses, so that the same image gives the same pixels here.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from var_jax.paths import user_path

# The reference resizes to 1.125× the final resolution before cropping (VAR's `mid_reso`).
RESIZE_RATIO = 1.125


def resized_shorter_side(image_size: int) -> int:
    """round(1.125·R): Python's round, as the reference computes it."""
    return round(RESIZE_RATIO * image_size)


def resize_shorter_side(image: Image.Image, shorter: int) -> Image.Image:
    """Shorter side to `shorter` with LANCZOS, aspect kept; the longer side truncated like torchvision's Resize."""
    width, height = image.size
    if width <= height:
        size = (shorter, int(shorter * height / width))
    else:
        size = (int(shorter * width / height), shorter)
    if size == (width, height):
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _check_crop(array: np.ndarray, crop: int):
    if array.shape[0] < crop or array.shape[1] < crop:
        raise ValueError(f"image of shape {array.shape} is smaller than the crop size {crop}")


def center_crop(array: np.ndarray, crop: int) -> np.ndarray:
    _check_crop(array, crop)
    top, left = center_crop_offsets(array.shape[0], array.shape[1], crop)
    return array[top:top + crop, left:left + crop]


def random_crop(array: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A crop at a uniformly drawn position, both ends inclusive (torchvision's RandomCrop)."""
    _check_crop(array, crop)
    top = int(rng.integers(0, array.shape[0] - crop + 1))
    left = int(rng.integers(0, array.shape[1] - crop + 1))
    return array[top:top + crop, left:left + crop]


def to_rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def preprocess(image: Image.Image | np.ndarray, image_size: int, *, train: bool,
               rng: np.random.Generator | None = None, hflip: bool = False) -> np.ndarray:
    """One image -> uint8 (R, R, 3): resize, random (train) or centre (eval) crop, optional random flip.

    `rng` is required when `train` is set; the caller seeds it per example so that the crops are reproducible."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    array = to_rgb_array(resize_shorter_side(image, resized_shorter_side(image_size)))
    if not train:
        return np.ascontiguousarray(center_crop(array, image_size))
    if rng is None:
        raise ValueError("preprocess(train=True) needs an rng for the random crop")
    array = random_crop(array, image_size, rng)
    if hflip and rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], as the reference's ToTensor followed by x·2−1."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


# to_model_range of every uint8 value. The device conversion looks these up rather than recomputing x·(2/255) − 1:
# XLA fuses that into one fma (its CPU backend does), which rounds once instead of twice and changes 158 of the
# 256 values. The table is 1 KiB; the lookup costs what the multiply-add would.
_MODEL_RANGE_TABLE = to_model_range(np.arange(256, dtype=np.uint8))


def to_model_range_on_device(images):
    """Inside a jitted step: uint8 [0, 255] -> float32 [-1, 1], bit for bit `to_model_range` on any backend.
    Float images are taken to be in the model's range already and only cast to float32."""
    if images.dtype != jnp.uint8:
        return images.astype(jnp.float32)
    return jnp.take(jnp.asarray(_MODEL_RANGE_TABLE), images.astype(jnp.int32), mode="clip")


def from_model_range(images) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], rounding; values outside the range are clipped."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_image_for_eval(path: str | os.PathLike, size: int) -> np.ndarray:
    """An image file -> uint8 (size, size, 3) via the reference's evaluation transform (RGB)."""
    with user_path(path).open("rb") as f, Image.open(f) as image:
        return preprocess(image, size, train=False)
