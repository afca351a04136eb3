"""Gradient accumulation: one optimizer update from `k = config.grad_accum_steps` micro-batches of the global
batch, inside one jitted step, so that a global batch (and with it the learning rate tblr·batch/256) that does
not fit in memory at once can still be the recipe's.

Micro-batch j (0 <= j < k) holds the examples j, j + k, j + 2k, ... of the global batch. The batch is sharded
over the data-parallel devices in contiguous blocks, so each device's block splits into k local micro-batches
and no example moves between devices; this needs batch_size divisible by k × the data-parallel devices
(`grad_accum_steps`). `jax.lax.scan` runs the micro-batches one after another, so only one micro-batch's
activations are live at a time; the carried sums (one gradient-sized tree) are float32.

What equality holds: every micro-batch holds batch/k examples, so the mean over the micro-batches of their
means (losses, gradients, accuracies) is the mean over the global batch, and the step equals the one-shot
step up to float32 rounding wherever it draws no random numbers. Randomness: micro-batch j draws from
fold_in(key, j) (`micro_batch_key`); with k = 1 nothing is split, scanned or folded: the step is the one
without accumulation, bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from var_jax.sharding import constrain, data_parallel_size
from var_jax.train.stage import ConfigError

FIELD = "grad_accum_steps"


def grad_accum_steps(config, mesh) -> int:
    """config.grad_accum_steps (1 when absent), checked against the global batch and the mesh."""
    k = config.get(FIELD, 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{FIELD}: must be a positive integer, got {k!r}")
    batch, dp = int(config.batch_size), data_parallel_size(mesh)
    if batch % (k * dp):
        raise ConfigError(f"{FIELD}: batch_size {batch} does not split into {k} micro-batches over the {dp} "
                          f"data-parallel devices (it must be divisible by {k} × {dp} = {k * dp})")
    return k


def micro_batch_key(key, index, k: int):
    """The key micro-batch `index` draws from: `key` itself when k = 1, else fold_in(key, index)."""
    return key if k == 1 else jax.random.fold_in(key, index)


def split_micro_batches(batch, k: int):
    """Every (B, ...) leaf -> (k, B/k, ...), micro-batch j holding the examples j, j + k, ..."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def merge_micro_batches(stacked):
    """The inverse of `split_micro_batches`: (k, B/k, ...) -> (B, ...) in the global batch's order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), stacked)


def _on_batch_axis(tree):
    """Keep each micro-batch spread over the data-parallel devices, as the global batch was."""
    return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def _accumulator(x):
    return jnp.zeros(x.shape, jnp.float32 if jnp.issubdtype(x.dtype, jnp.inexact) else x.dtype)


def accumulate(fn: Callable[[Any, Any], tuple[Any, Any, Any]], batch, k: int, key=None) -> tuple[Any, Any, Any]:
    """Run `fn(micro_batch, key)` -> (means, sums, per_example) over the k micro-batches of `batch`.

    `batch`: a tree of (B, ...) arrays (per-example entries only; anything shared belongs in fn's closure).
    Returns (means averaged over the micro-batches, sums summed, per_example (B/k, ...) leaves put back in the
    global batch's order); float leaves of means and sums are accumulated in float32. `key` (or None) reaches
    micro-batch j as `micro_batch_key(key, j, k)`. k = 1 calls fn once on the whole batch with `key`."""
    if k == 1:
        return fn(batch, key)

    def body(carry, xs):
        index, micro = xs
        means, sums, per_example = fn(_on_batch_axis(micro), None if key is None else micro_batch_key(key, index, k))
        carry = jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, (means, sums))
        return carry, per_example

    xs = (jnp.arange(k), split_micro_batches(batch, k))
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
    means_shape, sums_shape, _ = jax.eval_shape(lambda mb: fn(mb[1], key), one)
    init = jax.tree.map(_accumulator, (means_shape, sums_shape))
    (mean_sums, sums), stacked = jax.lax.scan(body, init, xs)
    return jax.tree.map(lambda x: x / k, mean_sums), sums, merge_micro_batches(stacked)
