"""The reference VAR optimizer recipe, in optax.

AdamW(b1 0.9, b2 0.95, eps 1e-8) with the peak learning rate scaled by the global batch (lr = tblr·batch/256),
a linear warmup from wp0·lr, then a schedule of the reference `utils/lr_control.py` (`optim.schedule`):
  lin0      flat for the first 5% of the post-warmup steps, then linear down to wpe·lr at the last step;
  lin<T>    (0 <= T <= 1, e.g. lin0.8) linear from lr down to a midpoint m·lr over the first fraction T of the
            post-warmup steps, then linear down to wpe·lr at the last step, m = (1 + wpe + (1-wpe)(1-T)) / 2;
  constant  lr throughout;
  auto      (the default) the reference's rule: lin<pg> with progressive training on (progressive.fraction
            pg > 0; arg_util.py sets `sche = f'lin{pg:g}'`), else lin0. Any other value is used as given.
Weight decay follows a half cosine from `wd` to `wd_end` over the whole run; global-norm gradient clipping
(2.0) before AdamW. With gradient accumulation `batch` is still the global batch, so is the learning rate.

The learning rate and weight decay are injected hyper-parameters (`optax.inject_hyperparams`), so the
values used at each step live in the optimizer state and can be logged from there.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# The reference's `filter_params(..., nowd_keys=...)` set in train.py: parameters whose name contains one of
# these are not decayed (neither are biases and 1-D parameters). class_emb, word_embed and head ARE decayed.
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")

# lin0: the fraction of the post-warmup steps that keeps the peak lr (`T = 0.05` in lr_control.py).
LIN0_FLAT_FRACTION = 0.05
# lin<T>: the reference parses T from the name; 'lin0' itself is the 5%-flat schedule above, not T = 0.
LIN_PREFIX = "lin"
# The learning rate of the reference recipe is given for a global batch of this size.
REFERENCE_BATCH = 256


def peak_learning_rate(optim_cfg, batch_size: int) -> float:
    return float(optim_cfg.tblr) * batch_size / REFERENCE_BATCH


def warmup_length(optim_cfg, total_steps: int) -> float:
    """The warmup in steps before rounding: `optim.warmup_steps` if set (>= 0), else `optim.warmup_fraction` of
    the run (the reference: ep/50 of ep epochs). The reference rounds it for the learning rate but compares the
    step with the unrounded value in its progressive schedule."""
    steps = int(optim_cfg.get("warmup_steps", -1))
    return float(steps) if steps >= 0 else float(optim_cfg.warmup_fraction) * total_steps


def warmup_steps(optim_cfg, total_steps: int) -> int:
    """The warmup of the learning rate: `warmup_length` rounded as lr_control.py rounds it."""
    return round(warmup_length(optim_cfg, total_steps))


def schedule_name(optim_cfg, progressive_fraction: float = 0.0) -> str:
    """`optim.schedule` with 'auto' resolved the reference's way: lin<pg> (formatted as `f'lin{pg:g}'`) when
    progressive training is on (pg = progressive.fraction > 0), else lin0."""
    name = str(optim_cfg.schedule)
    if name != "auto":
        return name
    return f"{LIN_PREFIX}{progressive_fraction:g}" if progressive_fraction > 0 else "lin0"


def _lin_fraction(name: str) -> float | None:
    """T of a 'lin<T>' schedule name (0 <= T <= 1), or None when the name is not of that form."""
    if not name.startswith(LIN_PREFIX) or name == "lin0":
        return None
    try:
        fraction = float(name[len(LIN_PREFIX):])
    except ValueError:
        return None
    return fraction if 0.0 <= fraction <= 1.0 else None


def lin_fraction_decay(peak: float, wpe: float, fraction: float, span: int) -> optax.Schedule:
    """lr_control.py's `lin<T>` after warmup, as a function of the steps since warmup ended: from peak linearly
    to the midpoint m·peak at progress T, then linearly to wpe·peak at progress 1 (the last step), with
    progress = steps / span (held at 1 past the last step, as optax's linear schedules are) and
    m = (1 + wpe + (1 - wpe)(1 - T)) / 2. T = 0 is a single line (m = 1); with T = 1 the first line runs to the
    end (the reference's second part divides 0 by 0 at the last step)."""
    mid = (1.0 + wpe + (1.0 - wpe) * (1.0 - fraction)) / 2.0

    def schedule(count):
        passed = jnp.minimum(jnp.asarray(count, jnp.float32) / span, 1.0)
        if fraction == 0:
            return peak * (wpe + (mid - wpe) * (1.0 - passed))
        first = 1.0 + (mid - 1.0) * passed / fraction
        if fraction == 1:
            return peak * first
        second = wpe + (mid - wpe) * (1.0 - passed) / (1.0 - fraction)
        return peak * jnp.where(passed < fraction, first, second)
    return schedule


def learning_rate_schedule(optim_cfg, batch_size: int, total_steps: int,
                           progressive_fraction: float = 0.0) -> optax.Schedule:
    """Warmup then `optim.schedule` (see the module docstring; 'auto' resolved by `schedule_name`). Step 0 is
    the first update."""
    peak = peak_learning_rate(optim_cfg, batch_size)
    wp = warmup_steps(optim_cfg, total_steps)
    name = schedule_name(optim_cfg, progressive_fraction)
    fraction = _lin_fraction(name)
    if name == "constant":
        decay = optax.constant_schedule(peak)
    elif fraction is not None:
        decay = lin_fraction_decay(peak, float(optim_cfg.wpe), fraction, max(total_steps - 1 - wp, 1))
    elif name == "lin0":
        # lr_control.py measures progress after warmup as (it - wp) / (max_it - 1 - wp): the last step reaches wpe.
        span = max(total_steps - 1 - wp, 1)
        flat = LIN0_FLAT_FRACTION * span
        decay = optax.join_schedules(
            [optax.constant_schedule(peak),
             optax.linear_schedule(peak, float(optim_cfg.wpe) * peak, transition_steps=span - flat)],
            boundaries=[flat])
    else:
        raise ValueError(f"optim.schedule: unknown schedule {name!r} (use 'auto', 'lin0', 'lin<T>' with 0 <= T <= 1, "
                         "or 'constant')")
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


def make_optimizer(optim_cfg, *, batch_size: int, total_steps: int, mask,
                   progressive_fraction: float = 0.0) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with injected (scheduled) learning rate and weight decay.

    `mask`: tree of bools over the params (see `decay_mask`), True = decayed. `progressive_fraction`: the VAR
    stage's progressive.fraction, which 'auto' schedules follow."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "b1", "b2", "eps"))(
        learning_rate=learning_rate_schedule(optim_cfg, batch_size, total_steps, progressive_fraction),
        b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
        weight_decay=weight_decay_schedule(optim_cfg, total_steps), mask=mask)
    clip = float(optim_cfg.grad_clip)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else optax.chain(optax.identity(), adamw)


def current_hyperparams(opt_state) -> Mapping[str, Any]:
    """The learning rate and weight decay that the last update used (injected hyper-parameters)."""
    hp = opt_state[1].hyperparams
    return {"lr": hp["learning_rate"], "wd": hp["weight_decay"]}
