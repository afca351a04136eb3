"""Infinity's bitwise head, read out: a VARConfig with head='bitwise' emits d two-way logits per token instead of a
V = 2^d-way softmax (VAR.logits gives (..., 2d), bit j's pair at [2j, 2j + 1], class 1 = the bit is set), for the
d bits of a BSQ tokenizer's token (tokenizer/bsq.py: ids are the bits packed most significant first).

The loss is Infinity's trainer's: each bit's two-way cross-entropy (label smoothing over its two classes, PyTorch's
convention), averaged over the d bits, which gives one value per token for the usual per-token weights.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from var_jax.tokenizer.bsq import bits_to_ids, ids_to_bits


def bit_logits(logits, bits: int):
    """(..., 2d) head outputs -> (..., d, 2) per-bit logits (float32)."""
    if logits.shape[-1] != 2 * bits:
        raise ValueError(f"a bitwise head with {bits} bits gives {2 * bits} logits per token, got {logits.shape[-1]}")
    return logits.astype(jnp.float32).reshape(*logits.shape[:-1], bits, 2)


def bitwise_cross_entropy(logits, target_ids, bits: int, label_smoothing: float = 0.0):
    """(B, L) cross-entropy per token: the mean over its d bits of each bit's two-way cross-entropy."""
    per_bit = bit_logits(logits, bits)
    targets = ids_to_bits(target_ids, bits)
    if label_smoothing == 0.0:
        losses = optax.softmax_cross_entropy_with_integer_labels(per_bit, targets)
    else:
        one_hot = optax.smooth_labels(jnp.eye(2, dtype=jnp.float32)[targets], label_smoothing)
        losses = optax.softmax_cross_entropy(per_bit, one_hot)
    return jnp.mean(losses, axis=-1)


def bit_correct(logits, target_ids, bits: int):
    """(B, L, d) float32: 1.0 where a bit's more likely class is the target's bit."""
    return (jnp.argmax(bit_logits(logits, bits), axis=-1) == ids_to_bits(target_ids, bits)).astype(jnp.float32)


def predicted_ids(logits, bits: int):
    """(B, L) int32: the token whose every bit is the more likely one (the greedy token)."""
    return bits_to_ids(jnp.argmax(bit_logits(logits, bits), axis=-1))
