"""Edit masks of zero-shot editing (the reference's `demo_zero_shot_edit.ipynb`), computed on the host.

A *keep mask* is 1 where the source image's tokens are kept and 0 where the model regenerates them. It is
built at the latent resolution (patch_nums[-1]²) and, for each scale, resized to pn×pn with PyTorch-style
bilinear interpolation (align_corners=False, no antialiasing), thresholded at > 0.5, and forced to all-ones
when pn² ≤ 3 (the first scales are always copied from the source).

Modes: `inpaint` regenerates the marked region (box or white mask pixels) and keeps the rest;
`outpaint` keeps the marked region and regenerates everything around it.
"""
from __future__ import annotations

import numpy as np

EDIT_MODES = ("inpaint", "outpaint")
# scales with at most this many tokens always keep the source tokens (reference: `if ph * pw <= 3`)
ALWAYS_KEEP_MAX_TOKENS = 3
THRESHOLD = 0.5


def _check_mode(mode: str):
    if mode not in EDIT_MODES:
        raise ValueError(f"edit mode must be one of {EDIT_MODES}, got {mode!r}")


def box_keep_mask(latent_size: int, box, mode: str) -> np.ndarray:
    """Keep mask (latent_size, latent_size) float32 from a box (y0, x0, y1, x1) given as fractions of the image
    side in [0, 1]; the box covers rows round(y0·s):round(y1·s) and columns round(x0·s):round(x1·s)."""
    _check_mode(mode)
    y0, x0, y1, x1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (y0, x0, y1, x1)) or y1 <= y0 or x1 <= x0:
        raise ValueError(f"box must be fractions 0 <= y0 < y1 <= 1, 0 <= x0 < x1 <= 1; got {tuple(box)}")
    region = np.zeros((latent_size, latent_size), np.float32)
    region[round(y0 * latent_size):round(y1 * latent_size), round(x0 * latent_size):round(x1 * latent_size)] = 1
    return 1 - region if mode == "inpaint" else region


def image_keep_mask(mask: np.ndarray, latent_size: int, mode: str) -> np.ndarray:
    """Keep mask from a grey mask image (H, W) in [0, 1] (white = marked region), H and W multiples of
    latent_size: each latent cell is marked when more than half of its pixels are."""
    _check_mode(mode)
    mask = np.asarray(mask, np.float64)
    if mask.ndim != 2 or mask.shape[0] % latent_size or mask.shape[1] % latent_size:
        raise ValueError(f"mask must be a 2-D image whose sides are multiples of {latent_size}, got {mask.shape}")
    cell_h, cell_w = mask.shape[0] // latent_size, mask.shape[1] // latent_size
    coverage = mask.reshape(latent_size, cell_h, latent_size, cell_w).mean(axis=(1, 3))
    region = (coverage > THRESHOLD).astype(np.float32)
    return 1 - region if mode == "inpaint" else region


def _bilinear_taps(in_size: int, out_size: int):
    """Per output index: (low index, high index, low weight, high weight) of PyTorch's CPU bilinear kernel
    (align_corners=False, no antialias), with its arithmetic: scale = in/out in float32, source index
    (i+0.5)·scale − 0.5 in double, clamped at 0, rounded to float32. The rounding decides cells that sit on the
    0.5 threshold (16 → 13 gives 0.5000005 where the exact value is 0.5), so it is reproduced, not computed
    exactly: values agree with PyTorch to 1 ulp and every threshold decision agrees (tests/test_edit.py)."""
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    # the scale is a float32, the (index + 0.5) arithmetic double, the result rounded to float32
    src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0).astype(np.float32)
    lo = src.astype(np.int64)
    hi = np.where(lo < in_size - 1, lo + 1, lo)
    w_hi = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, np.float32(1) - w_hi, w_hi


def bilinear_resize(x: np.ndarray, out_size: int) -> np.ndarray:
    """PyTorch `F.interpolate(mode='bilinear', align_corners=False)` of (..., h, w) float32 to (..., out, out):
    h0·(w0·x00 + w1·x01) + h1·(w0·x10 + w1·x11), in float32 like the reference."""
    x = np.asarray(x, np.float32)
    r_lo, r_hi, r_w0, r_w1 = _bilinear_taps(x.shape[-2], out_size)
    c_lo, c_hi, c_w0, c_w1 = _bilinear_taps(x.shape[-1], out_size)
    rows_lo, rows_hi = x[..., r_lo, :], x[..., r_hi, :]
    top = c_w0 * rows_lo[..., c_lo] + c_w1 * rows_lo[..., c_hi]
    bottom = c_w0 * rows_hi[..., c_lo] + c_w1 * rows_hi[..., c_hi]
    return r_w0[:, None] * top + r_w1[:, None] * bottom


def scale_keep_masks(keep_mask: np.ndarray, patch_nums) -> list[np.ndarray]:
    """Per-scale boolean keep masks (pn, pn) from a latent-resolution keep mask (or a batch (B, h, w) of them:
    then each is (B, pn, pn))."""
    keep_mask = np.asarray(keep_mask, np.float32)
    out = []
    for pn in patch_nums:
        keep = bilinear_resize(keep_mask, pn) > THRESHOLD
        if pn * pn <= ALWAYS_KEEP_MAX_TOKENS:
            keep = np.ones_like(keep)
        out.append(keep)
    return out
