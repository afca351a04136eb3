"""The transformer passes of the sampling accelerators (var_jax/sample/accelerate.py), each through
`VAR.forward_layers` with its own layer step; everything runs inside the sampler's jit with static shapes.

- `prefill`: a refiner's cache over the drafted scales in one block-causal pass (windowed with a KV window);
- `scale_step`: one scale against a cache layout (cache_layout.py): its queries read the visible slots, its keys
  go to its own slot; at a pruned scale each block computes only its kept tokens and the others take the
  restore source's output of that block, area-upsampled;
- `window_key_mask`: the key mask of a KV window for a scanned (traced) step over natural positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.sample.cache_layout import visible_scales
from var_jax.scale_config import scale_begin_ends, scale_ids
from var_jax.tokenizer.resize import area_resize
from var_jax.transformer.attention import QueryGroup, block_causal_groups

CACHE_AXES = ("layers", "batch", "seq", "heads", None)


def _layer_rows(stacked, layer, offset: int, rows: int):
    """Positions [offset, offset+rows) of one layer of a stacked (layers, B, S, H, hd) cache array."""
    return jax.lax.dynamic_slice(stacked, (layer, 0, offset, 0, 0),
                                 (1, stacked.shape[1], rows, *stacked.shape[3:]))[0]


def _write(cache, layer, offset: int, k, v):
    return {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype)[None],
                                               (layer, 0, offset, 0, 0))
            for name, new in (("k", k), ("v", v))}


def prefill_groups(patch_nums, num_scales: int, window) -> tuple[QueryGroup, ...]:
    """Query groups of the prefill over the first num_scales scales: block-causal, or with a KV window the same
    windowed mask the cached steps apply."""
    if window is None:
        return block_causal_groups(tuple(patch_nums[:num_scales]))
    ids = np.asarray(scale_ids(tuple(patch_nums[:num_scales])))
    visible = visible_scales(num_scales, window)
    sees = np.zeros((num_scales, num_scales), bool)
    for s, vis in enumerate(visible):
        sees[s, list(vis) + [s]] = True
    return (QueryGroup(0, len(ids), len(ids), sees[ids[:, None], ids[None, :]]),)


def prefill(var, x, cond, cache, groups, collect: tuple[tuple[int, int], ...] = ()):
    """Write the keys of x (B, P, C), the drafted prefix's inputs, into cache positions [0, P) under `groups`.
    collect: (begin, end) position ranges whose per-block outputs are returned (restore sources of pruning).
    Returns (cache, tuple of (layers, B, end-begin, C) outputs)."""

    def layer_fn(block, x, block_cond, cache, layer):
        def kv_fn(k, v):
            return k, v, groups, _write(cache, layer, 0, k, v)
        x, cache = block(x, block_cond, kv_fn)
        return x, cache, tuple(x[:, b:e] for b, e in collect)

    _, cache, outs = var.forward_layers(x, cond, cache, layer_fn)
    return cache, outs


def scale_step(var, x, cond, cache, layout, si: int, kept: int, restore=None, collect: bool = False):
    """Scale si (static) against `layout`. x (B, pn², C); kept: tokens each block computes (pn² = all; fewer:
    pruning, with `restore` the (layers, B, n_src, C) block outputs of the restore source). collect: also return
    this scale's per-block outputs (layers, B, pn², C) for a later pruned scale.
    Returns (logits (B, pn², V), cache, outputs or None)."""
    reads = layout.reads(si)
    slot = layout.slots[si]
    tokens = x.shape[1]

    def kv_fn(cache, layer):
        def attend_to(k, v):
            # reads come from the cache as it was: this scale's slot overlaps none of the slots it reads
            keys = [_layer_rows(cache["k"], layer, o, n) for o, n in reads] + [k]
            values = [_layer_rows(cache["v"], layer, o, n) for o, n in reads] + [v]
            new = cache if slot is None else _write(cache, layer, slot[0], k, v)
            cat = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(
                [p.astype(k.dtype) for p in parts], axis=1)
            return cat(keys), cat(values), None, new
        return attend_to

    def layer_fn(block, x, block_cond, cache, layer):
        if kept == tokens:
            x, cache = block(x, block_cond, kv_fn(cache, layer))
        else:
            x, cache = _pruned_block(block, x, block_cond, kv_fn(cache, layer), kept, restore[layer])
        return x, cache, x if collect else None

    logits, cache, outs = var.forward_layers(x, cond, cache, layer_fn)
    return logits, cache, outs


def _pruned_block(block, x, block_cond, kv_fn, kept: int, source):
    """One block on the `kept` tokens of x (B, L, C) farthest (L2) from the mean token; the other positions take
    `source` (B, n_src, C), the restore scale's output of this block, area-upsampled to the scale's side."""
    batch, tokens, width = x.shape
    x32 = x.astype(jnp.float32)
    distance = jnp.sum(jnp.square(x32 - x32.mean(axis=1, keepdims=True)), axis=-1)   # (B, L)
    _, index = jax.lax.top_k(distance, kept)                                           # (B, kept)
    y, kv_aux = block(jnp.take_along_axis(x, index[..., None], axis=1), block_cond, kv_fn)
    side, source_side = int(round(tokens ** 0.5)), int(round(source.shape[1] ** 0.5))
    base = area_resize(source.reshape(batch, source_side, source_side, width), side).reshape(batch, tokens, width)
    rows = jnp.arange(batch)[:, None]
    return base.astype(y.dtype).at[rows, index].set(y), kv_aux


def window_key_mask(patch_nums, window, si, kv_len: int):
    """(kv_len,) bool: the natural positions a traced scale si may attend to under KV window (C, W): scales
    [0, C) and [si−W, si]."""
    sinks, recent = window
    ids = jnp.asarray(scale_ids(tuple(patch_nums))[:kv_len], jnp.int32)
    return (ids < sinks) | ((ids >= si - recent) & (ids <= si))


def scale_ranges(patch_nums, scales) -> tuple[tuple[int, int], ...]:
    """Natural (begin, end) positions of the given scales."""
    begin_ends = scale_begin_ends(tuple(patch_nums))
    return tuple(begin_ends[s] for s in scales)
