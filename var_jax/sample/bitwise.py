"""The sampler's draw for a bitwise head (transformer/bitwise_head.py): every bit of every token is drawn from its
own two-way softmax, with the sampling settings applied per bit as Infinity's sampler does:

  guidance     (1 + t)·cond − t·uncond, mixed on every bit's two logits (before this draw, as for an index head)
  top-k        over a bit's two values: 1 is greedy (the likelier value); 2 or more keeps both (no effect)
  top-p        over a bit's two values: the rarer one is dropped when its probability is at most 1 − top_p
  more_smooth  Gumbel-softmax over the two values at the reference's temperature: the soft code (q1 − q0)/√d
               instead of ±1/√d

Each image draws from its own key (as filtering.draw_tokens), so batching and devices change no bit.

The filter is `filtering.filter_logits` for two entries (test_bitwise checks it), written out so that every keep /
drop decision is made from one read of the pair: the sort-based filter compares each logit with a sorted copy of
itself, and inside a large jitted program XLA:CPU may recompute the guidance mix for the two uses with different
rounding, which then drops kept entries (seen here: a third of the bits filtered in a guided, top-p run).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from var_jax.sample.filtering import draw_tokens, smooth_embedding
from var_jax.tokenizer.bsq import bits_to_codes, bits_to_ids, code_scale
from var_jax.transformer.bitwise_head import bit_logits


def filter_pairs(logits, top_k: int = 0, top_p: float = 0.0):
    """filter_logits over the last axis of size 2 (top-k then top-p, dropped entries -inf): top-k 1 keeps the
    larger (both on a tie); top-p drops the first of the pair in ascending stable order (the smaller; on a tie the
    first) when its probability is at most 1 - top_p."""
    low, high = logits[..., 0], logits[..., 1]
    keep = jnp.ones(logits.shape, bool)
    if top_k == 1:
        keep = jnp.stack([low >= high, high >= low], axis=-1)
    if top_p > 0:
        first_is_low = low <= high                                    # the stable ascending sort's first entry
        kept_both = keep[..., 0] & keep[..., 1]
        p_first = jnp.where(kept_both, jax.nn.sigmoid(-jnp.abs(high - low)), 0.0)   # its share of the kept mass
        drop_first = p_first <= 1 - top_p
        keep = keep & ~jnp.stack([drop_first & first_is_low, drop_first & ~first_is_low], axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def draw_bits(keys, logits, ratio, bits: int, options):
    """keys (B, 2, ...) (draw, smoothing) per image, guided logits (B, l, 2·bits) -> (token ids (B, l) int32,
    codes (B, l, bits) float32, the map the tokenizer adds)."""
    per_bit = bit_logits(logits, bits)
    batch, length = per_bit.shape[:2]
    filtered = filter_pairs(per_bit.reshape(batch, length * bits, 2), options.top_k, options.top_p)
    drawn = draw_tokens(keys[:, 0], filtered).reshape(batch, length, bits)
    if options.more_smooth:
        values = jnp.stack([-code_scale(bits), code_scale(bits)])[:, None]     # (2, 1): a bit's two code values
        codes = smooth_embedding(keys[:, 1], filtered, ratio, values).reshape(batch, length, bits)
    else:
        codes = bits_to_codes(drawn)
    return bits_to_ids(drawn), codes
