"""The reference VAR optimizer recipe, in optax.

AdamW(b1 0.9, b2 0.95, eps 1e-8) with the peak learning rate scaled by the global batch (lr = tblr·batch/256),
a linear warmup from wp0·lr, then the `lin0` schedule of the reference `utils/lr_control.py` (flat for the
first 5% of the post-warmup steps, then linear down to wpe·lr at the last step); weight decay follows a
half cosine from `wd` to `wd_end` over the whole run; global-norm gradient clipping (2.0) before AdamW.

The learning rate and weight decay are injected hyper-parameters (`optax.inject_hyperparams`), so the
values used at each step live in the optimizer state and can be logged from there.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import optax
from flax import nnx

# The reference's `filter_params(..., nowd_keys=...)` set in train.py: parameters whose name contains one of
# these are not decayed (neither are biases and 1-D parameters). class_emb, word_embed and head ARE decayed.
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")

# lin0: the fraction of the post-warmup steps that keeps the peak lr (`T = 0.05` in lr_control.py).
LIN0_FLAT_FRACTION = 0.05
# The learning rate of the reference recipe is given for a global batch of this size.
REFERENCE_BATCH = 256


def peak_learning_rate(optim_cfg, batch_size: int) -> float:
    return float(optim_cfg.tblr) * batch_size / REFERENCE_BATCH


def warmup_steps(optim_cfg, total_steps: int) -> int:
    """`optim.warmup_steps` if set (>= 0), else `optim.warmup_fraction` of the run (the reference: ep/50 of ep)."""
    steps = int(optim_cfg.get("warmup_steps", -1))
    if steps < 0:
        steps = round(float(optim_cfg.warmup_fraction) * total_steps)
    return steps


def learning_rate_schedule(optim_cfg, batch_size: int, total_steps: int) -> optax.Schedule:
    """Warmup then `lin0` (or a constant lr with `schedule='constant'`). Step 0 is the first update."""
    peak = peak_learning_rate(optim_cfg, batch_size)
    wp = warmup_steps(optim_cfg, total_steps)
    if optim_cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif optim_cfg.schedule == "lin0":
        # lr_control.py measures progress after warmup as (it - wp) / (max_it - 1 - wp): the last step reaches wpe.
        span = max(total_steps - 1 - wp, 1)
        flat = LIN0_FLAT_FRACTION * span
        decay = optax.join_schedules(
            [optax.constant_schedule(peak),
             optax.linear_schedule(peak, float(optim_cfg.wpe) * peak, transition_steps=span - flat)],
            boundaries=[flat])
    else:
        raise ValueError(f"optim.schedule: unknown schedule {optim_cfg.schedule!r} (use 'lin0' or 'constant')")
    if wp == 0:
        return decay
    warmup = optax.linear_schedule(float(optim_cfg.wp0) * peak, peak, transition_steps=wp)
    return optax.join_schedules([warmup, decay], boundaries=[wp])


def weight_decay_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Half cosine from `wd` at step 0 to `wd_end` at the last step."""
    wd, wd_end = float(optim_cfg.wd), float(optim_cfg.wd_end)
    if wd == wd_end:
        return optax.constant_schedule(wd)
    span = max(total_steps - 1, 1)
    return lambda step: wd_end + (wd - wd_end) * 0.5 * (1 + jax.numpy.cos(math.pi * step / span))


def _param_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def decay_mask(param_state) -> Any:
    """True where the reference decays a parameter, as a tree of bools with the structure of the pure params.

    Takes the `nnx.State` of `nnx.Param`s (with metadata) so that stacked layers (a leading `layers` logical
    axis) count as their per-layer rank for the reference's "1-D parameters are not decayed" rule."""
    def one(path, var):
        name = _param_name(path)
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        rank = len(value.shape)
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        if names:
            rank -= sum(1 for n in names if n == "layers")
        leaf = name.rsplit(".", 1)[-1]
        no_decay = rank <= 1 or "bias" in leaf or any(k in name for k in NO_DECAY_KEYS)
        return not no_decay
    mask = jax.tree_util.tree_map_with_path(one, param_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(mask) if isinstance(mask, nnx.State) else mask


def make_optimizer(optim_cfg, *, batch_size: int, total_steps: int, mask) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with injected (scheduled) learning rate and weight decay.

    `mask`: tree of bools over the params (see `decay_mask`), True = decayed."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "b1", "b2", "eps"))(
        learning_rate=learning_rate_schedule(optim_cfg, batch_size, total_steps),
        b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
        weight_decay=weight_decay_schedule(optim_cfg, total_steps), mask=mask)
    clip = float(optim_cfg.grad_clip)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else optax.chain(optax.identity(), adamw)


def current_hyperparams(opt_state) -> Mapping[str, Any]:
    """The learning rate and weight decay that the last update used (injected hyper-parameters)."""
    hp = opt_state[1].hyperparams
    return {"lr": hp["learning_rate"], "wd": hp["weight_decay"]}
