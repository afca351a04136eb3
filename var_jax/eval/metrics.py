"""Image reconstruction metrics (numpy, float64)."""
from __future__ import annotations

import numpy as np


def psnr_per_image(images, references, max_value: float = 255.0) -> np.ndarray:
    """PSNR in dB of each image against its reference: 10·log10(max² / mse), mse over H, W and channels.

    Both are (N, H, W, C) (uint8 with max_value 255, or floats in [0, max_value]). Identical images give +inf.
    """
    a = np.asarray(images, dtype=np.float64)
    b = np.asarray(references, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"psnr: images {a.shape} and references {b.shape} must both be (N, H, W, C)")
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(max_value ** 2 / mse)
