"""Image arrays as files: uint8 conversion, grids of a batch, the format an output extension asks for."""
from __future__ import annotations

import math
import os
import zipfile

import numpy as np
from PIL import Image

from var_jax.paths import atomic_write


def to_uint8(images01) -> np.ndarray:
    """[0, 1] floats -> uint8, rounding to nearest (the ADM evaluator's layout is uint8 NHWC)."""
    return np.clip(np.rint(np.asarray(images01, np.float32) * 255.0), 0, 255).astype(np.uint8)


def to_unit_range(images, min_side: int = 1) -> np.ndarray:
    """NHWC images, uint8 in [0, 255] or float in [-1, 1] (the model's range), 1 or 3 channels -> float32 in
    [0, 1]; the classifiers' input check (sides >= min_side) comes with it."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3]) < min_side:
        raise ValueError(f"expected NHWC images with 1 or 3 channels and sides >= {min_side}, got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip((images.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 NHWC (N images) -> one uint8 HWC image, `columns` per row (default ≈ sqrt(N))."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 NHWC images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        y = padding + (i // columns) * (h + padding)
        x = padding + (i % columns) * (w + padding)
        grid[y:y + h, x:x + w] = image
    return grid


def save_grid(path, images: np.ndarray, columns: int | None = None) -> None:
    """A PNG grid, written atomically (any path var_jax.paths.user_path accepts)."""
    grid = image_grid(images, columns)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def image_format(path) -> str:
    """The PIL format that writes `path`'s extension ('PNG' for .png); a clear error for one PIL can't write."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{os.fspath(path)}: cannot write images with extension {suffix or '(none)'!r} "
                         f"(use .png, .jpg, .webp or .bmp)")
    return fmt


def write_npz_streaming(path, entries) -> None:
    """An uncompressed .npz written entry by entry without holding any array whole, atomically.

    entries: (name, dtype, shape, chunks) each, `chunks` an iterable of arrays (or bytes) whose C-order bytes, in
    order, make up the (shape) array; np.load reads the result like any np.savez file."""

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, dtype, shape, chunks in entries:
                with zf.open(f"{name}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array_header_2_0(
                        entry, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
                    for chunk in chunks:
                        entry.write(chunk if isinstance(chunk, bytes) else
                                    np.ascontiguousarray(chunk, dtype=dtype).tobytes())
    atomic_write(path, write)
