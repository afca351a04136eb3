"""What the sampling accelerators (accelerate.py) change in the sampler's walk over the scales, as a mixin of the
walker (sampler._ScaleWalker): at the cfg stop scale the rows are cut to the conditional ones, at the draft scale
the refiner takes over (its cache prefilled over the drafted scales), and an exact step runs against the phase's
cache layout (windowed and/or pruned) instead of the plain cache. With every accelerator off, each hook is the
plain sampler's own step.

The walker provides: var, cond, guided, patch_nums, tok_cfg, batch, options, embed_input(si, x_in).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from var_jax.sample.accelerated_forward import (CACHE_AXES, prefill, prefill_groups, scale_ranges, scale_step,
                                                window_key_mask)
from var_jax.scale_config import scale_begin_ends
from var_jax.sharding import constrain

def _conditional_rows(x, axis: int):
    """Rows 0, 2, 4, ...: the conditional row of every (cond, uncond) pair."""
    return jax.lax.slice_in_dim(x, 0, x.shape[axis], 2, axis)


def _zero_cache(var, rows: int, length: int):
    return jax.tree.map(lambda c: constrain(c, CACHE_AXES), var.init_cache(rows, length=length))


class AcceleratedWalk:
    """The accelerators' hooks of the scale walker (see the module docstring)."""

    def init_accelerators(self, rows_labels, refiner, phases):
        self.accel = self.options.accel
        self.rows_labels = rows_labels
        self.refiner = refiner
        self.phases = {p.model: p for p in phases}
        self.phase = self.phases.get("main")   # None: the plain sampler
        self.block_outputs = {}   # pruning's restore sources: scale -> (layers, rows, pn², C)
        self.drafted = {}         # the refiner's prefill inputs: scale -> (B, pn², Cvae)

    # ---- before a segment -----------------------------------------------------------------------------------
    def enter(self, si: int, state):
        """Called before the segment that starts at scale si (the plan is cut at both scales)."""
        if self.guided and si == self.accel.cfg_stop_scale:
            state = self._stop_guidance(state)
        if si == self.accel.draft_scales:
            state = self._hand_over(si, state)
        return state

    def _stop_guidance(self, state):
        """Cut every row-carrying value to the conditional rows, once; the logits are unguided from here."""
        cache, f_hat, x = state
        cache = jax.tree.map(lambda c: constrain(_conditional_rows(c, 1), CACHE_AXES), cache)
        self.cond = _conditional_rows(self.cond, 0)
        self.rows_labels = _conditional_rows(self.rows_labels, 0)
        self.block_outputs = {s: _conditional_rows(o, 1) for s, o in self.block_outputs.items()}
        self.guided = False
        return cache, f_hat, _conditional_rows(x, 0)

    def _hand_over(self, n: int, state):
        """The refiner takes over at scale n: its cache over the drafted scales [0, n) in one block-causal pass
        (their inputs as the main model drew them), then its input of scale n."""
        _, f_hat, _ = state
        self.var, self.phase = self.refiner, self.phases["refiner"]
        self.cond = self.var.cond_embedding(self.rows_labels)
        prefix = jnp.concatenate([self.var.first_scale_input(self.cond)]
                                 + [self.embed_input(j, self.drafted[j]) for j in range(1, n)], axis=1)
        cache = _zero_cache(self.var, prefix.shape[0], self.phase.layout.length)
        sources = [s for s in self.phase.collect if s < n]
        cache, outs = prefill(self.var, prefix, self.cond, cache,
                              prefill_groups(self.patch_nums, n, self.accel.kv_window),
                              scale_ranges(self.patch_nums, sources))
        self.block_outputs = dict(zip(sources, outs))
        return cache, f_hat, self.embed_input(n, self.drafted[n])

    # ---- inside a step --------------------------------------------------------------------------------------
    def recording(self, si: int) -> bool:
        """Whether scale si's tokenizer input is kept for a refiner's prefill."""
        return self.accel.draft_scales is not None and si <= self.accel.draft_scales

    def record_input(self, si: int, x_in):
        if x_in is not None and self.recording(si):
            self.drafted[si] = x_in

    def window_mask(self, si, kv_len: int):
        """A scanned step's key mask under the KV window (None without one)."""
        if self.accel.kv_window is None:
            return None
        return window_key_mask(self.patch_nums, self.accel.kv_window, si, kv_len)

    def forward_exact(self, si: int, x, cache):
        """Scale si's transformer pass: the plain cached forward, or the phase's layout (window, pruning)."""
        if self.phase is None or self.phase.layout.natural:
            return self.var.forward_cached(x, self.cond, cache, scale_begin_ends(self.patch_nums)[si][0])
        source = self.phase.source_of(si)
        logits, cache, outs = scale_step(self.var, x, self.cond, cache, self.phase.layout, si, self.phase.kept[si],
                                         restore=None if source is None else self.block_outputs[source],
                                         collect=si in self.phase.collect)
        if outs is not None:
            self.block_outputs[si] = outs
        return logits, cache
