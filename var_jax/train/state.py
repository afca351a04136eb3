"""The train state pytree and where its leaves live on the mesh.

`TrainState` holds only arrays (params and optimizer state as plain nested dicts), so it can be printed,
saved by orbax and resharded. The module structure (nnx graphdef) and the non-trainable variables (buffers)
are kept beside it in `ModelParts`: they are rebuilt from the config, never checkpointed.

The abstract state (shapes, dtypes, shardings; no memory) is computed once by `abstract_train_state` and used
for the jitted init (`out_shardings`: big models are born sharded), for the step's in/out shardings and as
the restore target of checkpoints, so restoring onto another mesh is the same code path as starting.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from var_jax.checkpoints import ModelParts, pure_dict, split_model
from var_jax.sharding import batch_sharding, replicated, state_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: number of updates done
    params: Any              # nested dict of float32 arrays (the nnx.Param leaves)
    opt_state: Any           # optax state; its param-shaped subtrees mirror `params`
    rng: jax.Array           # uint32[2] base key; per-step keys are fold_in(rng, step), so resume is exact
    counters: Any            # {name: int32 scalar} fault counters (COUNTERS), replicated; checkpointed with the rest


# Fault counters kept in the state, so that they are cumulative over resumes and need no host sync per step:
#   skipped_steps   steps whose loss, gradient norm or updated params were not finite (their update was dropped)
#   nonfinite_run   such steps in a row, up to the current one (0 after a finite step); the trainer stops the run
#                   at config.max_nonfinite_steps
#   skipped_images  unreadable training images replaced by the next readable one (the batch's `skipped_images`)
COUNTERS = ("skipped_steps", "nonfinite_run", "skipped_images")


def zero_counters() -> dict:
    return {name: jnp.zeros((), jnp.int32) for name in COUNTERS}


def tree_all_finite(tree) -> jax.Array:
    """One bool scalar: every floating-point leaf of `tree` is finite.

    Written as all(not(stack(any non-finite))): XLA keeps that one reduction, which every leaf's update then reads.
    all(stack(all finite)) it rewrote into a chain of one `and` per leaf and copied the chain into each leaf's
    update fusion (leaves² ops: the tiny GAN tokenizer's step compiled to 189k HLO lines in 100 s instead of 47k
    lines in 44 s; an optimization barrier does not stop it, XLA:CPU removes barriers before fusing)."""
    leaves = [jnp.any(~jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(~jnp.stack(leaves)) if leaves else jnp.bool_(True)


def finish_step(old, new, loss, grad_norm, batch) -> tuple[Any, dict]:
    """The end of every train step (VAR and tokenizer): drop a non-finite update and count faults.

    `old` is the state the step started from, `new` the state it computed (step already advanced); `batch` is the
    step's batch with its images as the model saw them (float, after transforms.to_model_range_on_device: uint8
    images are finite by construction, what the model reads need not be). When the loss, the gradient norm, any
    new parameter or any float in the batch is not finite, every field of `new` (params, optimizer state, and any
    other state such as the tokenizer's usage EMA) is replaced by `old`'s, bit for bit, except that the step still
    advances: the data iterator has consumed the batch and per-step keys are fold_in(rng, step), so step number,
    batch and keys stay aligned and a resumed run replays the same sequence. The optimizer's own count (the
    learning-rate schedule) does not advance. Returns (state, counter metrics)."""
    # The batch too: in the VAR stage a NaN image is quantized to valid tokens (argmin over NaN distances) and
    # would train silently on garbage.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & tree_all_finite(new.params) & tree_all_finite(batch)
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    c = old.counters
    skipped_images = jnp.sum(batch["skipped_images"]).astype(jnp.int32) if "skipped_images" in batch else 0
    counters = {"skipped_steps": c["skipped_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32),
                "nonfinite_run": jnp.where(finite, 0, c["nonfinite_run"] + 1).astype(jnp.int32),
                "skipped_images": c["skipped_images"] + skipped_images}
    return kept.replace(step=old.step + 1, counters=counters), dict(counters)


def mirror_shardings(tree, params_like, param_shardings, fallback: NamedSharding):
    """Shardings for an optimizer state: every subtree with the structure of the params takes the params'
    shardings (Adam's mu and nu), everything else (counts, injected hyper-parameters) is replicated."""
    params_def = jax.tree.structure(params_like)

    def is_param_tree(x):
        try:
            return jax.tree.structure(x) == params_def
        except Exception:
            return False
    return jax.tree.map(lambda x: param_shardings if is_param_tree(x) else fallback, tree, is_leaf=is_param_tree)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The abstract train state and its shardings, computed once per (model, optimizer, mesh)."""
    abstract: TrainState     # jax.ShapeDtypeStruct leaves, each carrying its sharding
    shardings: TrainState    # NamedSharding leaves


def abstract_train_state(parts: ModelParts, tx: optax.GradientTransformation, mesh: Mesh) -> StateLayout:
    param_shardings = pure_dict(state_shardings(parts.param_vars, mesh))
    abstract_params = pure_dict(parts.param_vars)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    rep = replicated(mesh)
    shardings = TrainState(step=rep, params=param_shardings,
                           opt_state=mirror_shardings(abstract_opt, abstract_params, param_shardings, rep), rng=rep,
                           counters={name: rep for name in COUNTERS})
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                        counters={name: jax.ShapeDtypeStruct((), jnp.int32) for name in COUNTERS})
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return StateLayout(abstract=abstract, shardings=shardings)


def init_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                     layout: StateLayout, mesh: Mesh, seed: int) -> TrainState:
    """Initialise params and optimizer state directly into their shardings (one jitted call)."""
    def init(key):
        param_key, step_key = jax.random.split(key)
        _, params, _ = split_model(model_fn(nnx.Rngs(param_key)))
        params = pure_dict(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=step_key,
                          counters=zero_counters())

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=layout.shardings)(jax.random.PRNGKey(seed))


def param_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def batch_shardings(mesh: Mesh, batch) -> Any:
    """Leading axis over the data-parallel devices for every array of the batch; scalars replicated."""
    return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape)) if len(x.shape) else replicated(mesh), batch)


def jit_train_step(step_fn, layout: StateLayout, mesh: Mesh, batch_example, frozen_shardings=None):
    """jax.jit of step_fn(state, batch, frozen) with explicit shardings; the state is donated.

    `batch_example`: any pytree with the batch's shapes (arrays or ShapeDtypeStructs). Metrics are replicated."""
    rep = replicated(mesh)
    return jax.jit(step_fn,
                   in_shardings=(layout.shardings, batch_shardings(mesh, batch_example), frozen_shardings),
                   out_shardings=(layout.shardings, rep),
                   donate_argnums=(0,))
