"""Logit filtering, guidance mixing and the token draw of the VAR sampler (VAR_REFERENCE.md §3).

All functions are pure and batch-row independent: every row of logits is filtered on its own and every image
draws from its own key, so sharding or re-batching the images never changes what any one image gets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# more_smooth Gumbel temperature, as in the reference (borrowed there from MaskGIT):
# tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
SMOOTH_TAU_START = 0.27
SMOOTH_TAU_DECAY = 0.95
SMOOTH_TAU_MIN = 0.005


def guidance_strength(cfg: float, si: int, num_scales: int, schedule: str = "linear") -> float:
    """t of `(1+t)·cond − t·uncond` at scale si. 'linear' is the reference ramp cfg·si/(SN−1) (0 at the first
    scale); 'constant' uses cfg at every scale."""
    if schedule == "linear":
        return cfg * si / max(num_scales - 1, 1)
    if schedule == "constant":
        return float(cfg)
    raise ValueError(f"cfg schedule must be 'linear' or 'constant', got {schedule!r}")


def mix_guidance(logits_cond, logits_uncond, t):
    """Classifier-free guidance in float32."""
    t = jnp.asarray(t, jnp.float32)
    return (1 + t) * logits_cond.astype(jnp.float32) - t * logits_uncond.astype(jnp.float32)


def top_k_mask(logits, top_k: int):
    """Keep every logit ≥ the k-th largest of its row (ties with the k-th are all kept). top_k ≤ 0: no-op."""
    vocab = logits.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return logits
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_mask(logits, top_p: float):
    """Nucleus filter as in the reference: sort ascending, drop entries whose cumulative softmax is ≤ 1−top_p,
    always keep the largest. top_p ≤ 0: no-op."""
    if top_p <= 0:
        return logits
    order = jnp.argsort(logits, axis=-1)  # ascending, stable
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
    # scatter the decision back to vocabulary order: position order[j] gets drop_sorted[j]
    drop = jnp.zeros_like(drop_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def filter_logits(logits, top_k: int = 0, top_p: float = 0.0):
    """top-k then top-p, exactly the reference's order; removed entries become −inf.

    Equal to top_p_mask(top_k_mask(logits, top_k), top_p) with one sort instead of three passes (top-k's sort,
    top-p's argsort, a scatter back): one stable ascending sort of (logit, index) gives both the k-th largest
    logit and top-p's order. Entries below the k-th largest only ever sit at the front of the order (−inf, zero
    probability, always dropped), so masking them after the sort leaves the sorted values and every cumulative sum
    bit for bit what top_p_mask computes.

    Every keep / drop decision is made in sorted order and carried back by rank (a second sort inverts the
    permutation), never by comparing the logits with their sorted copy: inside a large jitted program XLA:CPU may
    compute the logits twice with different rounding (e.g. the guidance mix), and such a comparison then drops
    entries that the sorted order keeps (seen: whole rows −inf in a guided top-p sampler)."""
    vocab = logits.shape[-1]
    if top_p <= 0:
        return top_k_mask(logits, top_k)
    axis = logits.ndim - 1
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    sorted_logits, order = jax.lax.sort((logits, index), dimension=axis, num_keys=1, is_stable=True)
    drop_sorted = jnp.zeros(logits.shape, bool)
    if 0 < top_k < vocab:
        drop_sorted = sorted_logits < sorted_logits[..., vocab - top_k:vocab - top_k + 1]
        sorted_logits = jnp.where(drop_sorted, -jnp.inf, sorted_logits)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop_sorted = drop_sorted | (cumulative <= 1 - top_p).at[..., -1].set(False)
    _, rank = jax.lax.sort((order, index), dimension=axis, num_keys=1)   # rank[v]: v's position in the order
    return jnp.where(jnp.take_along_axis(drop_sorted, rank, axis=-1), -jnp.inf, logits)


def smooth_tau(ratio):
    return jnp.maximum(SMOOTH_TAU_START * (1 - SMOOTH_TAU_DECAY * ratio), SMOOTH_TAU_MIN)


def draw_tokens(keys, logits):
    """One categorical draw per row: keys (B, 2) (one per image), logits (B, l, V) already filtered."""
    return jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(keys, logits)


def smooth_embedding(keys, filtered_logits, ratio, codebook):
    """The reference's `more_smooth` path: gumbel_softmax(filtered·(1+ratio), tau, hard=False) @ E.
    keys (B, 2), filtered_logits (B, l, V), codebook (V, Cvae) -> (B, l, Cvae)."""
    gumbels = jax.vmap(lambda k: jax.random.gumbel(k, filtered_logits.shape[1:], jnp.float32))(keys)
    soft = jax.nn.softmax((filtered_logits * (1 + ratio) + gumbels) / smooth_tau(ratio), axis=-1)
    return soft @ codebook.astype(jnp.float32)
