"""VAR training loss and the metrics the reference reports.

Loss: token cross-entropy (float32, optional label smoothing) weighted per token and summed over the
sequence, then averaged over the batch. With uniform weights 1/L this is the reference's mean over all tokens.
Metrics: Lm / Lt (cross-entropy without smoothing over all tokens / the last scale) and Accm / Acct (top-1
token accuracy in %, all tokens / last scale).

A bitwise head (`bits` > 0, transformer/bitwise_head.py) has Infinity's per-token loss, the mean over the token's
bits of their two-way cross-entropies; its Accm / Acct are bit accuracies (Infinity's Acc_bit) and TokAccm /
TokAcct the share of tokens with every bit right.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax.transformer import bitwise_head


def token_weights(patch_nums: Sequence[int], scale_weights: Sequence[float] | None = None) -> np.ndarray:
    """(L,) per-token loss weights summing to 1: scale s gets weight w_s shared by its pn_s² tokens.

    None = uniform 1/L (the reference)."""
    sizes = np.array([pn * pn for pn in patch_nums], np.float64)
    w = np.ones(len(patch_nums)) if scale_weights is None or len(scale_weights) == 0 else np.asarray(scale_weights, np.float64)
    if w.shape != sizes.shape:
        raise ValueError(f"loss.scale_weights: needs one weight per scale ({len(patch_nums)}), got {len(w)}")
    if np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"loss.scale_weights: must be non-negative with one positive, got {list(w)}")
    per_token = np.repeat(w, sizes.astype(int))
    return (per_token / per_token.sum()).astype(np.float32)


def token_cross_entropy(logits, targets, label_smoothing: float = 0.0):
    """(B, L) cross-entropy in float32; label smoothing spreads `label_smoothing` uniformly over the V classes
    (PyTorch's `CrossEntropyLoss(label_smoothing=...)` convention)."""
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, label_smoothing))


def head_cross_entropy(logits, targets, label_smoothing: float = 0.0, bits: int = 0):
    """(B, L) per-token cross-entropy of an index head (bits = 0) or a bitwise head with `bits` bits."""
    if bits:
        return bitwise_head.bitwise_cross_entropy(logits, targets, bits, label_smoothing)
    return token_cross_entropy(logits, targets, label_smoothing)


def head_correct(logits, targets, bits: int = 0):
    """(B, L) float32: top-1 correctness (index head) or the share of the token's bits right (bitwise head)."""
    if bits:
        return jnp.mean(bitwise_head.bit_correct(logits, targets, bits), axis=-1)
    return token_correct(logits, targets)


def weighted_loss(per_token, weights):
    """Σ_l w_l·ce_l per image, mean over the batch."""
    return jnp.mean(jnp.sum(per_token * weights[None, :], axis=-1))


def token_correct(logits, targets):
    """(B, L) float32: 1.0 where the top-1 prediction is the target token."""
    return (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


def var_metrics(logits, targets, last_len: int, bits: int = 0) -> dict:
    """Lm, Lt, Accm, Acct as the reference logs them (no label smoothing, accuracies in %); a bitwise head's
    Accm / Acct are bit accuracies, and TokAccm / TokAcct its whole-token accuracies."""
    ce = head_cross_entropy(logits, targets, bits=bits)
    correct = head_correct(logits, targets, bits)
    metrics = {
        "Lm": jnp.mean(ce), "Lt": jnp.mean(ce[:, -last_len:]),
        "Accm": 100.0 * jnp.mean(correct), "Acct": 100.0 * jnp.mean(correct[:, -last_len:]),
    }
    if bits:
        exact = (bitwise_head.predicted_ids(logits, bits) == targets).astype(jnp.float32)
        metrics.update(TokAccm=100.0 * jnp.mean(exact), TokAcct=100.0 * jnp.mean(exact[:, -last_len:]))
    return metrics
