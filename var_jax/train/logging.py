"""What a run logs: one record of scalars per logged step (metrics.jsonl locally, metrics/ windows on a bucket),
the same scalars and sample grids as TensorBoard events, and a tqdm progress bar with ETA. Only process 0 writes;
where and how the records are stored is the workdir's business (train/workdir.py: RunLog, read_metrics).

Held-out metrics (`val/...`, train/held_out.py) go into the record of the step they were computed at (the
trainer logs every evaluated step), under TensorBoard tags of the same name (training scalars are `train/KEY`),
and the progress bar keeps showing the latest `val/loss` (VAR) or `val/rec_loss` (tokenizer).

On resume, the records after the restored checkpoint are removed before anything is written, so a run killed and
restarted leaves the same records as an uninterrupted one.
"""
from __future__ import annotations

import math
import time

import jax
from tqdm import tqdm

from var_jax.train.workdir import Workdir

# Shown on the progress bar when present; the held-out ones stay shown until the next evaluation.
BAR_KEYS = ("loss", "Accm", "lr", "images_per_s")
BAR_HELD_OUT_KEYS = ("val/loss", "val/rec_loss")


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricLogger:
    def __init__(self, workdir, *, total_steps: int, start_step: int, batch_size: int,
                 tokens_per_example: int | None = None, flops_per_example: float | None = None,
                 peak_flops: float | None = None, enabled: bool | None = None, progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.batch_size = batch_size
        self.tokens_per_example = tokens_per_example
        self.flops_per_example = flops_per_example
        self.peak_flops = peak_flops
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._log = self._bar = None
        self._held_out_shown = {}
        if not self.enabled:
            return
        self._log = Workdir.at(workdir).open_log(start_step)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def tick(self, steps: int = 1):
        if self._bar is not None:
            self._bar.update(steps)

    def restart_clock(self):
        """Start the next throughput interval now: time spent outside training steps (held-out evaluation)
        is not counted as step time."""
        self._last_time = time.perf_counter()

    def throughput(self, step: int, seconds: float | None = None) -> dict:
        """Images/s (and tokens/s, FLOP/s, MFU when known) since the previous call, over `seconds` of step time
        when the caller measured it (train/diagnosis.StepClock), else over the time since the previous call."""
        now = time.perf_counter()
        elapsed, steps = now - self._last_time if seconds is None else seconds, step - self._last_step
        self._last_time, self._last_step = now, step
        if steps <= 0 or elapsed <= 0:
            return {}
        images = steps * self.batch_size / elapsed
        out = {"images_per_s": images, "step_time_s": elapsed / steps}
        if self.tokens_per_example:
            out["tokens_per_s"] = images * self.tokens_per_example
        if self.flops_per_example:
            out["flops_per_s"] = images * self.flops_per_example
            if self.peak_flops:
                out["mfu"] = out["flops_per_s"] / self.peak_flops
        return out

    def write(self, step: int, metrics: dict):
        """Log scalars for `step` (device arrays are fetched here)."""
        metrics = {k: _plain(v) for k, v in jax.device_get(metrics).items()}
        if not self.enabled:
            return metrics
        self._log.write({"step": int(step), **metrics})
        for key, value in metrics.items():
            if isinstance(value, float):
                self._log.add_scalar(key if key.startswith("val/") else f"train/{key}", value, step)
        if self._bar is not None:
            self._held_out_shown.update({k: metrics[k] for k in BAR_HELD_OUT_KEYS if k in metrics})
            shown = {**{k: metrics[k] for k in BAR_KEYS if k in metrics}, **self._held_out_shown}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, float)})
        return metrics

    def add_image(self, tag: str, image_hwc, step: int):
        if self.enabled:
            self._log.add_image(tag, image_hwc, step)

    def end_window(self):
        """Before a checkpoint: the records logged so far are stored once this returns (train/workdir.py)."""
        if self.enabled:
            self._log.end_window(wait=True)

    def close(self):
        if not self.enabled:
            return
        try:
            self._log.close()
        finally:
            if self._bar is not None:
                self._bar.close()
