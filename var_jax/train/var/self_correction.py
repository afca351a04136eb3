"""Infinity's bitwise self-correction (its trainer's `BitwiseSelfCorrection.flip_requant`) for BSQ tokenizers,
`loss.bitwise_self_correction = p`.

Teacher forcing feeds the transformer the ground-truth history; at sampling time the history holds its own
mistakes. Self-correction trains on a corrupted history instead: walking the scales of the frozen tokenizer's
recursion, each scale's bits are flipped at random, re-quantized (their codes enter f_hat and the later
residuals), and the later scales' targets are the bits of what remains of the image given that corrupted history,
so the model learns to correct earlier errors. The transformer's input is built from the corrupted bits.

Flip rates as Infinity draws them: at every step and scale one rate r ~ uniform{0, 0.01, ..., p} for the whole
batch (mean p/2), then every bit of every position flips independently with probability r. Infinity flips the
first `noise_apply_layers` scales (13 in its recipe, every scale of its schedules); here every scale (flipping the
last changes no input). p = 0 is exactly teacher forcing: the rates are all 0 and no bit changes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from var_jax.tokenizer import bsq
from var_jax.tokenizer.config import TokenizerConfig

FIELD = "loss.bitwise_self_correction"
# Infinity draws the rate as randint(0, 100·p + 1) · 0.01: steps of 0.01
RATE_STEP = 0.01


def rate_steps(p: float) -> int:
    """p as a whole number of RATE_STEPs; ValueError naming the field when it is not one, or outside [0, 1]."""
    steps = round(p / RATE_STEP)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0 and math.isclose(steps * RATE_STEP, p, abs_tol=1e-9)):
        raise ValueError(f"{FIELD}: must be in [0, 1] in steps of {RATE_STEP} (the flip rate is drawn from "
                         f"{{0, {RATE_STEP}, ..., p}}), got {p!r}")
    return steps


def flip_rates(key, p: float, num_scales: int):
    """(num_scales,) float32 flip rates, each uniform over {0, 0.01, ..., p}."""
    return jax.random.randint(key, (num_scales,), 0, rate_steps(p) + 1).astype(jnp.float32) * RATE_STEP


def flipped(key, bit_array, rate):
    """bit_array (..., d) with every bit flipped independently with probability `rate`."""
    flips = jax.random.uniform(key, bit_array.shape) < rate
    return jnp.where(flips, 1 - bit_array, bit_array)


def self_corrected_tokens(f, cfg: TokenizerConfig, p: float, key):
    """Encoder features f (B, h, w, d) -> (targets, history): per-scale (B, pn²) int32 ids, the targets the bits of
    each scale's residual given the corrupted history of the scales before it, the history those bits after
    flipping (what the teacher-forcing input is built from)."""
    rate_key, flip_key = jax.random.split(key)
    rates = flip_rates(rate_key, p, cfg.num_scales)
    corrupt = lambda si, bits: flipped(jax.random.fold_in(flip_key, si), bits, rates[si])
    targets, history = [], []
    for bits, used, _ in bsq.encode_scales(f.astype(jnp.float32), cfg, corrupt):
        targets.append(bsq.bits_to_ids(bits))
        history.append(bsq.bits_to_ids(used))
    return targets, history
