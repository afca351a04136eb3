"""Progressive training (off by default, as in the reference): train on the first `prog_si + 1` scales only,
growing `prog_si` during the run, while the newest scale's loss weight ramps in.

Schedule (the reference's train.py / trainer.py, as a pure function of the step; the reference's iterations
are our steps, its `ep` epochs of `iters_train` iterations are `total_steps`):
  - while step <= warmup (the unrounded warmup length, as train.py compares it): prog_si = start_scale (pg0);
  - then prog_si grows linearly (rounded) to the last scale, reached at `fraction · total_steps` (pg);
  - the newest scale's weight ramps linearly, count/ramp_steps clamped to [0.01, 1], where count is 1 on the
    stage's first step (trainer.py's prog_it), over `ramp_steps` steps (pgwp; -1 = derived: the reference's
    default pgwp = ep/300 epochs, i.e. total_steps/300 steps, not rounded); no ramp in the first stage, which
    warmup already covers;
  - at the last scale everything is as without progressive training (full sequence, full weights).
The learning rate follows `lin<fraction>` then (the optimizer's 'auto' schedule, optimizer.schedule_name).
The sequence length (prog_si) changes the shapes, so each stage is its own compiled step (at most one per
scale); the ramp is a traced scalar.
"""
from __future__ import annotations

import dataclasses
import jax.numpy as jnp
import numpy as np

RAMP_FLOOR = 0.01   # the reference clamps the newest scale's weight at >= 0.01
# arg_util.py: pgwp = ep / 300 epochs when not given; in steps, total_steps / RAMP_DIVISOR.
RAMP_DIVISOR = 300
DERIVED = -1        # config value of progressive.ramp_steps that asks for the reference's default


@dataclasses.dataclass(frozen=True)
class ProgressiveSchedule:
    num_scales: int
    total_steps: int
    warmup_steps: float       # the warmup length before rounding (optimizer.warmup_length)
    fraction: float = 0.0     # pg: 0 = off; the last scale is reached at fraction·total_steps
    start_scale: int = 4      # pg0
    ramp_steps: float = 1.0   # pgwp, in steps (> 0; need not be whole)

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 and self.start_scale < self.num_scales - 1

    def scale_at(self, step: int) -> int:
        """prog_si for an update number (0-based); num_scales-1 = the full sequence."""
        last = self.num_scales - 1
        if not self.enabled:
            return last
        end = self.fraction * self.total_steps
        if step <= self.warmup_steps:
            return self.start_scale
        if step >= end:
            return last
        progress = min(max((step - self.warmup_steps) / max(end - self.warmup_steps, 1e-9), 0.0), 1.0)
        return self.start_scale + int(round(progress * (last - self.start_scale)))

    def stage_start(self, step: int) -> int:
        """First step of the stage that `step` is in (scale_at never decreases: binary search)."""
        si, lo, hi = self.scale_at(step), 0, step
        while lo < hi:
            mid = (lo + hi) // 2
            if self.scale_at(mid) < si:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def ramp_at(self, step: int) -> float:
        si = self.scale_at(step)
        if si == self.num_scales - 1 or si == self.scale_at(0):
            return 1.0
        done = step - self.stage_start(step) + 1   # the reference counts the current step
        return float(min(max(done / self.ramp_steps, RAMP_FLOOR), 1.0))


def ramp_steps_from(value, total_steps: int) -> float:
    """progressive.ramp_steps in steps: DERIVED (-1) -> total_steps / 300 (the reference's pgwp default)."""
    try:
        steps = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"progressive.ramp_steps: must be a number of steps or -1 (derived), got {value!r}") from None
    if steps == DERIVED:
        return total_steps / RAMP_DIVISOR
    if not steps > 0:
        raise ValueError(f"progressive.ramp_steps: must be > 0, or -1 for the reference's default "
                         f"(total_steps / {RAMP_DIVISOR}), got {value!r}")
    return steps


def progressive_from_config(prog_cfg, num_scales: int, total_steps: int, warmup_steps: float) -> ProgressiveSchedule:
    """The schedule of the config's `progressive` section; `warmup_steps`: optimizer.warmup_length (unrounded)."""
    sched = ProgressiveSchedule(num_scales=num_scales, total_steps=total_steps, warmup_steps=warmup_steps,
                                fraction=float(prog_cfg.fraction), start_scale=int(prog_cfg.start_scale),
                                ramp_steps=ramp_steps_from(prog_cfg.ramp_steps, total_steps))
    if sched.fraction < 0 or sched.fraction > 1:
        raise ValueError(f"progressive.fraction: must lie in [0, 1], got {sched.fraction}")
    if sched.fraction > 0 and not 0 <= sched.start_scale < num_scales:
        raise ValueError(f"progressive.start_scale: must lie in [0, {num_scales}), got {sched.start_scale}")
    return sched


def truncated_weights(weights: np.ndarray, slices, prog_si: int, ramp) -> np.ndarray:
    """The reference's weights for a truncated sequence: the first prog_si+1 scales keep their (full-length)
    weights, the newest scale's are multiplied by `ramp` (may be traced)."""
    begin, end = slices[prog_si]
    w = jnp.asarray(weights[:end])
    return w.at[begin:end].multiply(ramp)
