"""Dead-code restart for the codebook (not in the reference; an option of the tokenizer trainer).

The per-scale code-usage EMA itself is the reference's and lives beside the quantizer
(`quantizer.update_usage_ema` / `quantizer.code_usage_percent`, fed by the hit counts that
`quantize_for_training` returns). Here: codes whose EMA summed over scales falls below a threshold are re-drawn
from random current encoder features, so that they land where the data is. A pure function over arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dead_code_mask(ema, threshold: float):
    """(V,) bool: codes whose hit EMA summed over scales is below `threshold`."""
    return jnp.sum(ema, axis=0) < threshold


def restart_dead_codes(codebook, ema, features, key, threshold: float):
    """Re-initialise dead codes from random rows of `features`.

    codebook (V, C); ema (S, V); features (..., C) (e.g. the encoder output f, any leading shape).
    Returns (codebook, dead mask (V,)): dead rows replaced by features drawn uniformly with replacement, live rows
    untouched. The usage EMA is left as it is, so the logged usage stays truthful: a restarted code counts as used
    only once it is hit, and one still unused at the next restart is drawn again.
    """
    vocab_size, channels = codebook.shape
    if features.shape[-1] != channels:
        raise ValueError(f"features have {features.shape[-1]} channels, the codebook has {channels}")
    if ema.shape[-1] != vocab_size:
        raise ValueError(f"usage EMA has {ema.shape[-1]} codes, the codebook has {vocab_size}")
    rows = features.reshape(-1, channels).astype(codebook.dtype)
    picks = jax.random.randint(key, (vocab_size,), 0, rows.shape[0])
    dead = dead_code_mask(ema, threshold)
    return jnp.where(dead[:, None], rows[picks], codebook), dead
