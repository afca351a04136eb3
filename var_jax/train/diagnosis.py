"""What it takes to diagnose a slow run: a profiler window, the persistent compilation cache, and a clock that
splits the run's wall time by what it was spent on. The trainer only calls these.

Profiler (`config.profile_steps`, 'START:END', '' = off): a `jax.profiler` trace of the steps numbered START to
END - 1 (the numbers metrics.jsonl gives them; '100:105' is five steps), written by every process into its own
WORKDIR/profiles/process_{i} (TensorBoard's profile plugin or xprof read it). Every step is annotated
(`StepTraceAnnotation('train', step_num=...)`), so the viewer splits the trace by step.

Compilation cache (`config.compile_cache_dir`): JAX's persistent cache, so a restart, a resumed run and every
progressive stage read what an earlier run compiled. The trainer sets it once the resume guard has passed (its
first use creates the directory) and before the state is built or restored: what compiles earlier is small
helpers (tens of milliseconds for the digits VAR). '' = WORKDIR/compile_cache
(on a gs:// workdir the cache is in the bucket: JAX opens non-local paths through etils.epath), unless JAX's own
cache was configured already (JAX_COMPILATION_CACHE_DIR or jax.config), which is then kept; a path = that
directory; 'none' = off. JAX writes entries from process 0 only and every process reads them.

Time accounting (`StepClock`): each metrics record carries the seconds spent since the previous record on
compiling (tracing, lowering and XLA compilation or cache reads, from jax.monitoring's events), waiting for the
data, checkpointing (incl. storing the records it needs first), held-out evaluation, sample grids, profiling and,
in a run's first record, its start-up (model building, restore), as `time/KIND_s`; `step_time_s` is the pure step
time per step: what is left of the interval. The device runs ahead of the host, so each measured phase first
waits for the state it needs, and that wait counts as step time.

Goodput: `goodput` = `time/productive_s` / `time/wall_s`, over every run of the workdir. Productive time is the
pure step time of the steps the workdir's history keeps: a resumed run starts from the value in the record of
the restored step (each checkpointed step has its record, stored before the save), so steps recomputed after a
kill count once. Wall time is the time in `train()` of every run up to its last stored record: a resumed run
starts from the largest value any stored record holds, read before the records past the checkpoint are removed,
so the time a killed run lost counts too (all but its last unrecorded seconds).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

import jax
import jax.monitoring
from jax.experimental.compilation_cache import compilation_cache

from var_jax.paths import user_path
from var_jax.train.stage import ConfigError

CACHE_OFF = "none"
# Programs that compile faster than this are not worth an entry (reading one back from a bucket takes about as
# long); the train, eval and sampling steps of real models compile for longer. JAX's own default, named here.
MIN_COMPILE_TIME_S = 1.0
# No size limit: a large executable that compiled slowly is the one most worth keeping (-1 also stops JAX from
# overriding the limit per filesystem).
MIN_ENTRY_SIZE_BYTES = -1
# jax.monitoring duration events that together are the compile time of a jitted call (a cache hit is inside the
# backend one); monitoring.record_event names a persistent-cache hit.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
KINDS = ("compile", "data_wait", "checkpoint", "eval", "sample", "profile", "startup")


# ---- compilation cache ------------------------------------------------------------------------------------------

_ours = {"dir": None}     # the cache directory this module set last, to tell it apart from a user's own


def configure_compile_cache(setting: str, default_dir) -> str | None:
    """Point JAX's persistent compilation cache at the directory `setting` names (module docstring); returns it,
    or None when the cache is off. Call before anything compiles: JAX opens its cache at the first compile, once
    per process, so a change after that (a second train() in one process) resets it first."""
    setting = str(setting or "").strip()
    current = jax.config.jax_compilation_cache_dir
    users_own = not setting and bool(current) and current != _ours["dir"]
    if setting.lower() == CACHE_OFF:
        directory, enabled = current, False
    elif users_own:
        directory, enabled = current, True
    else:
        directory, enabled = str(user_path(setting or default_dir)), True
        _ours["dir"] = directory
    if (directory, enabled) != (current, jax.config.jax_enable_compilation_cache):
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_enable_compilation_cache", enabled)
    if enabled and not users_own:        # a user's own cache keeps the user's own settings
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
        if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
    return directory if enabled else None


# ---- time accounting --------------------------------------------------------------------------------------------

class _CompileTotals:
    """Seconds spent compiling and persistent-cache hits in this process so far (jax.monitoring listeners,
    registered once: JAX offers no public way to remove one)."""

    def __init__(self):
        self.seconds, self.cache_hits, self._lock = 0.0, 0, threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **_):
        if event in COMPILE_EVENTS:
            with self._lock:
                self.seconds += duration

    def _on_event(self, event: str, **_):
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1

    def read(self) -> tuple[float, int]:
        with self._lock:
            return self.seconds, self.cache_hits


_totals = None


def _compile_totals() -> _CompileTotals:
    global _totals
    if _totals is None:
        _totals = _CompileTotals()
    return _totals


class StepClock:
    """Splits the wall time of a run by kind (module docstring). Created at the start of `train()`."""

    def __init__(self):
        self._totals = _compile_totals()
        self._started = self._lap_time = time.perf_counter()
        self._compile_mark, self._hits_mark = self._totals.read()
        self._spent = dict.fromkeys(KINDS, 0.0)        # this interval, compile time excluded
        self._lap_step = 0
        self.base_wall = self.base_productive = 0.0    # earlier runs' sums (resume_from)
        self.productive = 0.0                          # this run's pure step time

    def resume_from(self, records: list[dict], start_step: int):
        """Continue the workdir's sums from its stored records (all of them, read before any is removed)."""
        kept = [r for r in records if int(r.get("step", -1)) <= start_step and "time/productive_s" in r]
        self.base_productive = float(kept[-1]["time/productive_s"]) if kept else 0.0
        self.base_wall = max((float(r["time/wall_s"]) for r in records if "time/wall_s" in r), default=0.0)

    def begin_loop(self, start_step: int):
        """The time since the clock started was the run's start-up."""
        self._lap_step = start_step
        self._spent["startup"] += self._outside_compile(self._started, self._compile_mark)

    def _outside_compile(self, since: float, compiled_before: float) -> float:
        """Seconds since `since`, less what was spent compiling (counted as compile time)."""
        elapsed = time.perf_counter() - since
        return max(elapsed - (self._totals.read()[0] - compiled_before), 0.0)

    @contextlib.contextmanager
    def measure(self, kind: str, wait_for=None):
        """Time a phase as `kind` (its compiles count as compile time); `wait_for` (e.g. the state) is waited
        for first, as step time."""
        if wait_for is not None:
            jax.block_until_ready(wait_for)
        since, compiled = time.perf_counter(), self._totals.read()[0]
        try:
            yield
        finally:
            self._spent[kind] += self._outside_compile(since, compiled)

    def lap(self, step: int) -> dict:
        """The time fields of the record of `step`, for the interval since the previous record."""
        now = time.perf_counter()
        compiled, hits = self._totals.read()
        spent = {**self._spent, "compile": compiled - self._compile_mark}
        steps = max(step - self._lap_step, 1)
        step_seconds = max(now - self._lap_time - sum(spent.values()), 0.0)
        self.productive += step_seconds
        wall = self.base_wall + (now - self._started)
        productive = self.base_productive + self.productive
        record = {**{f"time/{kind}_s": seconds for kind, seconds in spent.items()}, "time/step_s": step_seconds,
                  "step_time_s": step_seconds / steps, "compile_cache_hits": hits - self._hits_mark,
                  "time/productive_s": productive, "time/wall_s": wall,
                  "goodput": productive / wall if wall > 0 else 0.0}
        self._lap_time, self._lap_step = now, step
        self._compile_mark, self._hits_mark = compiled, hits
        self._spent = dict.fromkeys(KINDS, 0.0)
        return record


# ---- profiler ---------------------------------------------------------------------------------------------------

def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'START:END' -> (START, END) with 1 <= START < END; '' -> None; anything else a ConfigError."""
    text = str(text or "").strip()
    if not text:
        return None
    start, sep, end = text.partition(":")
    try:
        window = int(start), int(end)
    except ValueError:
        window = None
    if not sep or window is None or not 1 <= window[0] < window[1]:
        raise ConfigError(f"profile_steps: expected 'START:END' with 1 <= START < END (steps START..END-1), "
                          f"or '' for off, got {text!r}")
    return window


class ProfileWindow:
    """Starts a jax.profiler trace before step START and stops it after step END - 1 (1-based step numbers);
    the time starting and writing the trace takes is the clock's `profile` time."""

    def __init__(self, spec: str, profiles_dir, clock: StepClock):
        self.window = parse_profile_steps(spec)
        self.directory = user_path(profiles_dir) / f"process_{jax.process_index()}"
        self.clock, self.active = clock, False

    def annotate(self, step_number: int):
        """The context of one step in the trace (cheap when no trace is running)."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step_number)

    def before_step(self, step_number: int):
        if self.window and not self.active and self.window[0] <= step_number < self.window[1]:
            with self.clock.measure("profile"):
                self.directory.mkdir(parents=True, exist_ok=True)
                jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, step_number: int, state):
        if self.active and step_number >= self.window[1] - 1:
            self.stop(state)

    def stop(self, state=None):
        """End the trace (the device work of the traced steps is waited for, so it is in the trace)."""
        if self.active:
            with self.clock.measure("profile", wait_for=state):
                jax.profiler.stop_trace()
            self.active = False
