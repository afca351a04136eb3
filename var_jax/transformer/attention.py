"""Softmax attention for the VAR blocks: block-causal query groups and a memory-lean backward pass.

Two things make the plain masked attention slow on CPU (measured on the d8 train step, see the transformer
benchmark notes in the report of this change):
- the block-causal mask hides ~38 % of the L×L scores (VAR_REFERENCE §2: a token of scale s sees scales <= s),
  yet dense masked attention computes them all. Here the queries are cut into groups along scale boundaries:
  every large trailing scale is its own group and sees exactly the keys [0, end of its scale) with no mask at all;
  the small leading scales form one masked group. Each query row is in exactly one group, so the softmax of a
  group is the softmax of its rows: the result is the masked attention up to float32 rounding.
- autodiff of softmax(q·kᵀ)·v keeps the (B, H, l, S) probabilities of every layer for the backward pass (the
  scan over layers stacks them: hundreds of MB to zero-fill, write and read). `_attention` has a custom VJP that
  keeps only q, k, v, the output and the row log-sum-exp, and recomputes the probabilities from them (one extra
  q·kᵀ product, as flash attention does).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.scale_config import scale_begin_ends, scale_ids

# A trailing scale with at least this many tokens gets its own (unmasked) query group; the smaller leading scales
# share one masked group. Smaller groups skip more masked scores but make smaller, less efficient matmuls:
# 128 keeps the two largest 256 px scales (169 and 256 tokens) separate, leaving a 255-token masked prefix.
MIN_GROUP_QUERIES = 128


class QueryGroup(NamedTuple):
    """Queries [begin, end) attend to keys [0, kv_end); `mask` (end-begin, kv_end) bool or None (all visible)."""
    begin: int
    end: int
    kv_end: int
    mask: np.ndarray | None


def block_causal_groups(patch_nums, min_group_queries: int = MIN_GROUP_QUERIES) -> tuple[QueryGroup, ...]:
    """Query groups of the block-causal attention over the scales `patch_nums` (a prefix of the config's)."""
    ends = [end for _, end in scale_begin_ends(patch_nums)]
    split = len(ends)   # scales [split, ...) each get their own group
    while split > 1 and ends[split - 1] - ends[split - 2] >= min_group_queries:
        split -= 1
    groups = []
    if split > 0:
        ids = np.asarray(scale_ids(patch_nums[:split]))
        mask = ids[None, :] <= ids[:, None]
        groups.append(QueryGroup(0, ends[split - 1], ends[split - 1], None if mask.all() else mask))
    for si in range(split, len(ends)):
        groups.append(QueryGroup(ends[si - 1], ends[si], ends[si], None))
    return tuple(groups)


def token_causal_groups(length: int) -> tuple[QueryGroup, ...]:
    """The token-level causal mask of raster order (query t sees keys 0..t) as one masked query group."""
    return (QueryGroup(0, length, length, np.tril(np.ones((length, length), bool))),)


def grouped_attention(q, k, v, groups: tuple[QueryGroup, ...], scale: float):
    """Attention of q (B, L, H, hd) over k/v (B, L, H, hd) by query groups -> (B, L, H, hd)."""
    return _attention(q, k, v, None, _StaticGroups(groups), scale)


def dense_mask(groups: tuple[QueryGroup, ...]) -> np.ndarray:
    """The (L, L) bool mask that the query groups stand for (for backends that take one mask)."""
    length = groups[-1].end
    mask = np.zeros((length, length), bool)
    for g in groups:
        mask[g.begin:g.end, :g.kv_end] = True if g.mask is None else g.mask
    return mask


def attention(q, k, v, mask, scale: float):
    """Attention of q (B, l, H, hd) over k/v (B, S, H, hd); mask None or bool broadcastable to (B, H, l, S),
    True = keep (every query must keep at least one key). -> (B, l, H, hd) in q's dtype."""
    whole = QueryGroup(0, q.shape[1], k.shape[1], None)
    return _attention(q, k, v, mask, _StaticGroups((whole,)), scale)


class _StaticGroups:
    """The query groups as a hashable static argument (compared by identity of the plan's values)."""

    def __init__(self, groups):
        self.groups = groups
        self._key = tuple((g.begin, g.end, g.kv_end, None if g.mask is None else g.mask.tobytes())
                          for g in groups)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _StaticGroups) and self._key == other._key


def _acc(x):
    """Accumulation / softmax dtype: at least float32 (bfloat16 activations), float64 stays float64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _group_mask(group: QueryGroup, mask):
    """The static mask of a group, or the caller's runtime mask (only with a single whole group)."""
    return mask if group.mask is None else jnp.asarray(group.mask)


def _scores(q, k, mask, scale):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_acc(q))
    if scale != 1.0:
        s = s * scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _forward(q, k, v, mask, groups, scale):
    outs, log_sum_exps = [], []
    for g in groups.groups:
        s = _scores(q[:, g.begin:g.end], k[:, :g.kv_end], _group_mask(g, mask), scale)
        row_max = s.max(-1, keepdims=True)
        p = jnp.exp(s - row_max)
        denom = p.sum(-1, keepdims=True)
        out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v[:, :g.kv_end], preferred_element_type=_acc(q))
        outs.append((out / jnp.swapaxes(denom, 1, 2)).astype(q.dtype))   # denom (B, H, l, 1) -> (B, l, H, 1)
        log_sum_exps.append(row_max + jnp.log(denom))                       # (B, H, l, 1)
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out, tuple(log_sum_exps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, groups, scale):
    return _forward(q, k, v, mask, groups, scale)[0]


def _attention_fwd(q, k, v, mask, groups, scale):
    out, log_sum_exps = _forward(q, k, v, mask, groups, scale)
    return out, (q, k, v, mask, out, log_sum_exps)


def _attention_bwd(groups, scale, residuals, d_out):
    q, k, v, mask, out, log_sum_exps = residuals
    acc = _acc(q)
    # rowsum(dO ∘ O) of the softmax backward, for every query at once
    row_dot = jnp.einsum("bqhd,bqhd->bhq", d_out, out, preferred_element_type=acc)[..., None]
    d_q, d_k, d_v = [], jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc)
    for g, log_sum_exp in zip(groups.groups, log_sum_exps):
        q_g, k_g, v_g, d_out_g = q[:, g.begin:g.end], k[:, :g.kv_end], v[:, :g.kv_end], d_out[:, g.begin:g.end]
        p = jnp.exp(_scores(q_g, k_g, _group_mask(g, mask), scale) - log_sum_exp)   # masked scores: p = 0
        d_v = d_v.at[:, :g.kv_end].add(jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out_g,
                                                  preferred_element_type=acc))
        d_p = jnp.einsum("bqhd,bkhd->bhqk", d_out_g, v_g, preferred_element_type=acc)
        d_s = p * (d_p - row_dot[:, :, g.begin:g.end])        # softmax backward: P ∘ (dP − rowsum(dO ∘ O))
        d_s = (d_s * scale if scale != 1.0 else d_s).astype(q.dtype)
        d_q.append(jnp.einsum("bhqk,bkhd->bqhd", d_s, k_g, preferred_element_type=acc))
        d_k = d_k.at[:, :g.kv_end].add(jnp.einsum("bhqk,bqhd->bkhd", d_s, q_g, preferred_element_type=acc))
    d_q = d_q[0] if len(d_q) == 1 else jnp.concatenate(d_q, axis=1)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None   # no cotangent for the mask


_attention.defvjp(_attention_fwd, _attention_bwd)
