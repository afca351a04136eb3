"""Infinity's multi-scale binary spherical quantizer (BSQ) as pure functions; quantizer.py dispatches to them when
`cfg.quantizer == 'bsq'` (jit them with `cfg` static).

Per position the d = cfg.bits channels are normalised to the unit sphere and each replaced by its sign:
code = where(ẑ > 0, 1, -1)/√d, with a straight-through gradient. Nothing is learned. A position's token is its d
bits (bit j = 1 where code_j > 0), packed most significant first, as Infinity's `bit_indices` are ordered, into one
int32 id in [0, 2^d): token maps, token sets and editing masks are then those of the VQ path.

The recursion (Infinity's `MultiScaleBSQ.forward`): for each scale of side pn, quantize area(f_rest -> pn), bring the
codes back to the latent size bilinearly (no Phi; no resize at the last scale), add them to f_hat and subtract
them from f_rest. Everything runs in float32.

Training losses, per scale and then averaged over the scales (Infinity's `BSQ.forward` with its defaults
gamma0 = gamma = zeta = 1; the tokenizer trainer multiplies the result by loss.vq_weight, Infinity's lfq_weight):
    beta·mean((ẑ − sg(code))²)  +  entropy_weight·(H_sample − H_codebook)/inv_temperature
with the soft bit probabilities p = sigmoid(−4·ẑ/√d·inv_temperature), H_sample the mean over positions of the
summed per-bit entropies of (p, 1 − p), and H_codebook the summed per-bit entropies of their means over all
positions (entropy −Σ q·log(q + 1e-8)): each position should be sure of its bits, and every bit used both ways.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.resize import area_resize

_HIGHEST = jax.lax.Precision.HIGHEST
# Infinity's entropy terms: p = sigmoid(-SOFT_BIT_SCALE·ẑ/√d·inv_temperature), entropy -Σ q·log(q + ENTROPY_EPS)
SOFT_BIT_SCALE = 4.0
ENTROPY_EPS = 1e-8
# F.normalize's guard against a zero vector
NORM_EPS = 1e-12
# Per-bit usage: a bit counts as used when its rarer value takes at least this share of the positions (the VQ
# rule, 8 % of a uniform share, for a code of two values: 8 % of 1/2)
BIT_USAGE_MARGIN = 0.08 * 0.5
# how the transformer's next-scale input is resized from the summed codes: 'bilinear' as Infinity, 'area' as VAR
NEXT_INPUT_RESIZES = ("bilinear", "area")


# ---- resampling ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of PyTorch's linear interpolation with align_corners=False and no
    antialiasing, up or down: source x = max((i + 0.5)·in/out − 0.5, 0), taps floor(x) and the next (clamped)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bilinear_matrix: sizes must be positive, got in={in_size}, out={out_size}")
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        x = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = min(int(math.floor(x)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = x - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


def bilinear_resize(x, size: int):
    """PyTorch `F.interpolate(mode='bilinear', align_corners=False)` (Infinity's 'trilinear' on one frame) on NHWC."""
    if x.shape[1:3] == (size, size):
        return x
    rows = jnp.asarray(bilinear_matrix(x.shape[1], size), x.dtype)
    cols = jnp.asarray(bilinear_matrix(x.shape[2], size), x.dtype)
    y = jnp.einsum("oh,bhwc->bowc", rows, x, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, y, precision=_HIGHEST)


def resize_next_input(f_hat, size: int, resize: str):
    """The transformer's next-scale input map from the summed codes: bilinear (Infinity) or area (VAR)."""
    if resize == "bilinear":
        return bilinear_resize(f_hat, size)
    if resize == "area":
        return area_resize(f_hat, size)
    raise ValueError(f"next-scale input resize must be one of {NEXT_INPUT_RESIZES}, got {resize!r}")


# ---- bits, ids and codes ---------------------------------------------------------------------------------------

def code_scale(bits: int):
    """1/√d: every code component is ±code_scale (a point on the unit sphere)."""
    return jnp.float32(1.0 / math.sqrt(bits))


def _shifts(bits: int):
    return jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)    # most significant bit first


def ids_to_bits(ids, bits: int):
    """(...) int ids -> (..., d) int32 bits, most significant first."""
    return (jnp.asarray(ids, jnp.int32)[..., None] >> _shifts(bits)) & 1


def bits_to_ids(bit_array):
    """(..., d) bits in {0, 1} -> (...) int32 ids."""
    bits = bit_array.shape[-1]
    return jnp.sum(jnp.asarray(bit_array, jnp.int32) << _shifts(bits), axis=-1).astype(jnp.int32)


def bits_to_codes(bit_array):
    """(..., d) bits -> (..., d) float32 codes ±1/√d."""
    scale = code_scale(bit_array.shape[-1])
    return jnp.where(bit_array > 0, scale, -scale)


def ids_to_codes(ids, bits: int):
    return bits_to_codes(ids_to_bits(ids, bits))


def code_table(bits: int):
    """(2^d, d) float32: every code, row = its id (what an index head's sampler embeds with)."""
    return ids_to_codes(jnp.arange(2 ** bits, dtype=jnp.int32), bits)


def l2_normalise(z):
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), NORM_EPS)


def quantize(z):
    """(..., d) features -> (codes, bits, ẑ): ẑ = z/|z|, codes = sign(ẑ)/√d whose gradient passes to ẑ unchanged
    (straight-through, written so that the forward value is the code exactly), bits (ẑ > 0) as int32."""
    z_hat = l2_normalise(z)
    bits = (z_hat > 0).astype(jnp.int32)
    codes = bits_to_codes(bits) + (z_hat - jax.lax.stop_gradient(z_hat))
    return codes, bits, z_hat


def entropy_terms(z_hat, inv_temperature: float):
    """Infinity's analytical entropies of the soft bits of ẑ (..., d): (per-sample, codebook), each summed over bits."""
    d = z_hat.shape[-1]
    p = jax.nn.sigmoid(-SOFT_BIT_SCALE * z_hat / math.sqrt(d) * inv_temperature)
    probs = jnp.stack([p, 1.0 - p], axis=-1)                          # (..., d, 2)
    entropy = lambda q: -jnp.sum(q * jnp.log(q + ENTROPY_EPS), axis=-1)
    per_sample = jnp.mean(jnp.sum(entropy(probs), axis=-1))
    mean_probs = jnp.mean(probs.reshape(-1, d, 2), axis=0)            # (d, 2) over every position
    return per_sample, jnp.sum(entropy(mean_probs))


# ---- the multi-scale recursion ---------------------------------------------------------------------------------

def scale_contribution(cfg: TokenizerConfig, si: int, codes_BhwC):
    """What scale si adds to f_hat: its codes, bilinearly brought to the latent size (not at the last scale)."""
    if si != cfg.num_scales - 1:
        codes_BhwC = bilinear_resize(codes_BhwC, cfg.latent_size)
    return codes_BhwC


def encode_scales(f, cfg: TokenizerConfig, corrupt=None):
    """The encoding recursion over f (B, h, w, d) float32; yields per scale (bits, used bits, f_hat after it), bits
    (B, pn², d) those of the residual. `corrupt(si, bits) -> bits` (bitwise self-correction) replaces the bits that
    enter f_hat and the later residuals (re-quantized: their codes are taken from the corrupted bits)."""
    b, _, _, d = f.shape
    f_rest, f_hat = f, jnp.zeros_like(f)
    for si, pn in enumerate(cfg.patch_nums):
        _, bits, _ = quantize(area_resize(f_rest, pn))      # area: the identity at the last scale
        used = bits if corrupt is None else corrupt(si, bits)
        h = scale_contribution(cfg, si, bits_to_codes(used))
        f_hat, f_rest = f_hat + h, f_rest - h
        yield bits.reshape(b, pn * pn, d), used.reshape(b, pn * pn, d), f_hat


def f_to_tokens(f, cfg: TokenizerConfig):
    """f (B, h, w, d) -> (tokens: list of (B, pn²) int32 ids, f_hats after each scale)."""
    tokens, f_hats = [], []
    for bits, _, f_hat in encode_scales(f.astype(jnp.float32), cfg):
        tokens.append(bits_to_ids(bits))
        f_hats.append(f_hat)
    return tokens, f_hats


def quantize_for_training(f, cfg: TokenizerConfig):
    """The training forward; returns (f_hat, loss, tokens, ones) like quantizer.quantize_for_training:
      f_hat   Σ of every scale's straight-through codes: the decoder input, with gradients to the encoder through
              every scale (the codes subtracted from the residual are detached, Infinity's default);
      loss    mean over scales of beta·commitment + entropy_weight·(H_sample − H_codebook)/inv_temperature;
      tokens  list of (B, pn²) int32 ids;
      ones    (num_scales, d) float32 count of each bit's ones per scale (per-bit usage, `bit_usage_percent`)."""
    f = f.astype(jnp.float32)
    f_rest, f_hat = f, jnp.zeros_like(f)
    loss, tokens, ones = 0.0, [], []
    for si, pn in enumerate(cfg.patch_nums):
        codes, bits, z_hat = quantize(area_resize(f_rest, pn))
        commitment = jnp.mean((z_hat - jax.lax.stop_gradient(codes)) ** 2)
        per_sample, codebook = entropy_terms(z_hat, cfg.inv_temperature)
        loss = loss + cfg.beta * commitment + cfg.entropy_weight * (per_sample - codebook) / cfg.inv_temperature
        h = scale_contribution(cfg, si, codes)
        f_hat, f_rest = f_hat + h, f_rest - jax.lax.stop_gradient(h)
        tokens.append(bits_to_ids(bits.reshape(bits.shape[0], pn * pn, -1)))
        ones.append(jnp.sum(bits.reshape(-1, cfg.bits), axis=0).astype(jnp.float32))
    return f_hat, loss / cfg.num_scales, tokens, jnp.stack(ones)


def bit_usage_percent(ones_Sd, positions_S):
    """Per scale, % of the bits whose rarer value takes at least BIT_USAGE_MARGIN of the positions; ones_Sd the
    count (or its EMA) of each bit's ones, positions_S the positions counted at each scale."""
    share = ones_Sd / jnp.asarray(positions_S, jnp.float32)[:, None]
    used = jnp.minimum(share, 1.0 - share) >= BIT_USAGE_MARGIN
    return jnp.mean(used.astype(jnp.float32), axis=1) * 100
