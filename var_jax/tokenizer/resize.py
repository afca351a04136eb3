"""The two resampling operators of the multi-scale quantizer, matching PyTorch's `F.interpolate`.

- `area_resize`: PyTorch `mode='area'` (adaptive average pooling). No `jax.image.resize` method reproduces it for
  non-integer ratios (16 -> 13), so it is applied as two pooling matrices, one per spatial axis.
- `bicubic_resize`: PyTorch `mode='bicubic'` (align_corners=False, A = -0.75, border clamped), which
  `jax.image.resize(method='cubic-pytorch', antialias=False)` reproduces.

Images are NHWC; sizes are static Python ints.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _as_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix: output cell i averages input cells [floor(i·in/out), ceil((i+1)·in/out))."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"area_matrix: sizes must be positive, got in={in_size}, out={out_size}")
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        stop = -((-(i + 1) * in_size) // out_size)   # ceil division in integers: exact, no float rounding
        m[i, start:stop] = 1.0 / (stop - start)
    return m


def area_resize(x, size):
    """PyTorch `F.interpolate(mode='area')` on an NHWC array; `size` is an int or (h, w)."""
    if x.ndim != 4:
        raise ValueError(f"area_resize expects NHWC, got shape {x.shape}")
    out_h, out_w = _as_hw(size)
    _, in_h, in_w, _ = x.shape
    if (out_h, out_w) == (in_h, in_w):
        return x
    rows = jnp.asarray(area_matrix(in_h, out_h), dtype=x.dtype)
    cols = jnp.asarray(area_matrix(in_w, out_w), dtype=x.dtype)
    # HIGHEST: on accelerators the default matmul precision would round the averages (TF32/bf16 passes).
    y = jnp.einsum("oh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, y, precision=jax.lax.Precision.HIGHEST)


def bicubic_resize(x, size):
    """PyTorch `F.interpolate(mode='bicubic', align_corners=False)` on an NHWC array; `size` is an int or (h, w)."""
    if x.ndim != 4:
        raise ValueError(f"bicubic_resize expects NHWC, got shape {x.shape}")
    out_h, out_w = _as_hw(size)
    if (out_h, out_w) == tuple(x.shape[1:3]):
        return x
    return jax.image.resize(x, (x.shape[0], out_h, out_w, x.shape[3]), method="cubic-pytorch", antialias=False)
