"""Progressive training (off by default, as in the reference): train on the first `prog_si + 1` scales only,
growing `prog_si` during the run, while the newest scale's loss weight ramps in.

Schedule (the reference's `train.py`, simplified to a pure function of the step):
  - up to the end of warmup: prog_si = start_scale;
  - then prog_si grows linearly (rounded) to the last scale, reached at `fraction · total_steps`;
  - the newest scale's weight ramps linearly from 0.01 to 1 over `ramp_steps` steps after its stage begins
    (no ramp in the first stage, which warmup already covers);
  - at the last scale everything is as without progressive training (full sequence, full weights).
The sequence length (prog_si) changes the shapes, so each stage is its own compiled step (at most one per
scale); the ramp is a traced scalar.
"""
from __future__ import annotations

import dataclasses
import jax.numpy as jnp
import numpy as np

RAMP_FLOOR = 0.01   # the reference clamps the newest scale's weight at >= 0.01


@dataclasses.dataclass(frozen=True)
class ProgressiveSchedule:
    num_scales: int
    total_steps: int
    warmup_steps: int
    fraction: float = 0.0     # pg: 0 = off; the last scale is reached at fraction·total_steps
    start_scale: int = 4      # pg0
    ramp_steps: int = 1       # pgwp, in steps

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
        return float(min(max(done / max(self.ramp_steps, 1), RAMP_FLOOR), 1.0))


def progressive_from_config(prog_cfg, num_scales: int, total_steps: int, warmup_steps: int) -> ProgressiveSchedule:
    sched = ProgressiveSchedule(num_scales=num_scales, total_steps=total_steps, warmup_steps=warmup_steps,
                                fraction=float(prog_cfg.fraction), start_scale=int(prog_cfg.start_scale),
                                ramp_steps=int(prog_cfg.ramp_steps))
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
