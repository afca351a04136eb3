"""Training checkpoints: an orbax CheckpointManager over WORKDIR/checkpoints.

Each checkpoint holds the train state (model, optimizer, step, RNG, fault counters; restored straight onto the
shardings of the current abstract state, so a different mesh is the same code path). The data position is not
saved: it is the step (one global batch per step, data/pipeline.py), so a run resumes on any number of hosts or
grain workers. Older checkpoints also hold a `data` item (grain's per-process `process_{i}-of-{N}.json`); only
their `state` is read, so they resume on any process count too. Saves are asynchronous; `keep` checkpoints are
kept. A save refuses a state with a non-finite parameter (the train step never produces one; this is the last line
of defence).

Resume guard: WORKDIR/checkpoints/run_config.json records the model configuration and the run configuration that
shapes the result (everything but RUN_SETTINGS: step counts, intervals, mesh, dtypes...). Resuming with a config
that differs is refused, naming the fields. Workdirs from before run_config.json hold only model_config.json: the
model is checked and run_config.json is written from then on.

Unreadable checkpoints: `restore_latest` tries the newest first and falls back to older ones, saying which it
skipped and why; once an older one is read, the skipped ones are moved to WORKDIR/checkpoints_unreadable/ so
they are neither retried nor kept in place of good ones. With none readable the run stops (nothing is moved). (Orbax writes a step into a temporary directory renamed on commit, so a save
interrupted by SIGKILL leaves no step directory orbax would list.)

Best model (`BestModel`): with held-out evaluation on, the model whose evaluation gave the lowest value of the
stage's metric (`val/loss` for VAR, `val/rec_loss` for the tokenizer) is exported as a model directory,
WORKDIR/best_model (loadable like WORKDIR/model), and WORKDIR/best_model.json records its step and metrics. It is
kept apart from the checkpoint manager on purpose: resuming always continues from the *latest* checkpoint, and the
`keep` newest checkpoints are never deleted in favour of a better one. A run killed after exporting a best model
but before its checkpoint committed replays that step bit for bit, so the kept model stays the right one.
"""
from __future__ import annotations

import json
from typing import Any

import math

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from var_jax.orbax_loops import draining_event_loops
from var_jax.train.config_base import ADDED_FIELDS
from var_jax.train.optimizer import schedule_name
from var_jax.paths import atomic_write_text
from var_jax.train.stage import NonFiniteError, TrainingError
from var_jax.train.state import tree_all_finite
from var_jax.train.workdir import BEST_MODEL_DIR, BEST_MODEL_FILE, Workdir  # noqa: F401 (names used by callers)

MODEL_CONFIG_FILE = "model_config.json"       # the model config alone (older workdirs have only this)
RUN_CONFIG_FILE = "run_config.json"           # {"model": ..., "run": ...}

# Config fields that may change between a run and its resumption: they do not change what is computed (or, for
# total_steps, the user extends a run on purpose). Dotted names for nested fields.
RUN_SETTINGS = ("total_steps", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints",
                "num_sample_images", "max_nonfinite_steps", "peak_flops", "mesh", "mesh_dcn", "sharding_rules",
                "profile_steps", "compile_cache_dir",
                "compute_dtype",
                "model.remat", "model.attention_impl", "data.worker_count", "tokenizer_checkpoint",
                "eval_every", "eval_batch_size", "eval_class_dropout", "data.eval_split", "data.eval_dir",
                "grad_accum_steps")


class CheckpointMismatch(ValueError):
    """The workdir holds checkpoints of a different model or run configuration."""


class UnreadableCheckpoints(TrainingError):
    """Every checkpoint of the workdir failed to restore."""


def _differences(stored, current, prefix="") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            out += _differences(stored.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if stored == current else [f"{prefix.rstrip('.')}: checkpoint has {stored!r}, config has {current!r}"]


def run_identity(config) -> dict:
    """The config as JSON-able data, without RUN_SETTINGS."""
    data = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else json.loads(
        json.dumps(config))
    for name in RUN_SETTINGS:
        *parents, leaf = name.split(".")
        node = data
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def _comparable(record: dict) -> dict:
    """A recorded {"model", "run"} with the run's derived defaults resolved, so that a run recorded before a
    default became derived compares equal when it computes the same thing: optim.schedule 'auto' is lin0 without
    progressive training (lin<pg> with it), and without progressive training its ramp and start scale compute
    nothing."""
    record = json.loads(json.dumps(record))
    run = record.get("run") or {}
    progressive = run.get("progressive")
    fraction = float(progressive.get("fraction", 0.0)) if isinstance(progressive, dict) else 0.0
    optim = run.get("optim")
    if isinstance(optim, dict) and optim.get("schedule") == "auto":
        optim["schedule"] = schedule_name(ml_collections.ConfigDict(optim), fraction)
    if isinstance(progressive, dict) and fraction == 0:
        progressive.pop("ramp_steps", None)
        progressive.pop("start_scale", None)
    data = run.get("data")
    if isinstance(data, dict) and data.get("dir") == "":   # unset; runs recorded before token sets lack it
        data.pop("dir")
    for section, defaults in ADDED_FIELDS.items():   # runs recorded before these fields computed their defaults
        fields = run.get(section)
        if isinstance(fields, dict):
            for name, default in defaults.items():
                fields.setdefault(name, default)
    return record


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


@jax.jit
def _all_finite(params):
    return tree_all_finite(params)


class TrainCheckpointer:
    def __init__(self, workdir, *, keep: int, model_config: dict, run_config: dict | None = None):
        self.workdir = Workdir.at(workdir)
        self.directory = self.workdir.checkpoints
        self.model_config = json.loads(json.dumps(model_config))   # normalised: tuples -> lists
        self.run_config = json.loads(json.dumps(run_config)) if run_config is not None else None
        options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state",))

    # ---- the resume guard ------------------------------------------------------------------------------------
    def check_model_config(self):
        """Refuse to resume checkpoints of another model or run config; record them on a fresh run. Writes only
        into WORKDIR/checkpoints, and only when nothing there disagrees."""
        run_path, model_path = self.directory / RUN_CONFIG_FILE, self.directory / MODEL_CONFIG_FILE
        current = {"model": self.model_config, "run": self.run_config}
        if run_path.exists():
            stored = json.loads(run_path.read_text())
            if self.run_config is None:      # a caller that knows only the model
                stored, current = stored["model"], self.model_config
            else:
                stored, current = _comparable(stored), _comparable(current)
            diffs = _differences(stored, current)
            what = "a different run configuration"
        elif model_path.exists():            # an older workdir: only the model was recorded
            diffs = _differences(json.loads(model_path.read_text()), self.model_config)
            what = "a different model"
        else:
            diffs, what = [], ""
        if diffs:
            if any(d.startswith(("model.", "var.", "tokenizer.", "discriminator.")) for d in diffs):
                what = "a different model"
            raise CheckpointMismatch(
                f"the checkpoints in {self.directory} are of {what} than the config: "
                + "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
                + " (use a new --workdir, or the config the checkpoints were made with)")
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not model_path.exists():
                atomic_write_text(model_path, json.dumps(self.model_config, indent=2, sort_keys=True) + "\n")
            if not run_path.exists() and self.run_config is not None:
                atomic_write_text(run_path, json.dumps(current, indent=2, sort_keys=True) + "\n")

    # ---- save / restore --------------------------------------------------------------------------------------
    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Asynchronous save; returns whether a checkpoint was started (orbax skips existing steps)."""
        if step in self.manager.all_steps():
            return False
        check_finite(state, f"checkpoint at step {step}")
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)

    def restore(self, step: int, abstract_state) -> Any:
        """The train state at `step`, placed as `abstract_state` says (an older checkpoint's `data` item is left
        unread). Checkpoints from before the fault counters existed restore with zero counters."""
        def composite(target):
            return ocp.args.Composite(state=ocp.args.StandardRestore(target))
        try:
            return self.manager.restore(step, args=composite(abstract_state))["state"]
        except ValueError as error:
            if "counters" not in str(error) or "tree structures do not match" not in str(error):
                raise
        fields = {f: getattr(abstract_state, f) for f in abstract_state.__dataclass_fields__ if f != "counters"}
        restored = self.manager.restore(step, args=composite(fields))["state"]
        counters = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding),
                                abstract_state.counters)
        return abstract_state.replace(**restored, counters=counters)

    def restore_latest(self, abstract_state, log=print) -> tuple[int | None, Any]:
        """(step, state) of the newest readable checkpoint, or (None, None) when there is none. Unreadable ones
        are reported (one line each) and moved aside; when none is readable, UnreadableCheckpoints."""
        skipped = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with draining_event_loops():   # a failed read ends the others before the next is tried
                    state = self.restore(step, abstract_state)
            except Exception as error:  # noqa: BLE001 - any failure to read means "try the previous one"
                skipped[step] = _one_line(error)
                log(f"[train] skipping unreadable checkpoint at step {step}: {skipped[step]}")
                continue
            # Only once an older one has been read: a fault that hits every checkpoint (storage access, a bug)
            # must not move them all away.
            for bad in skipped:
                self._move_aside(bad)
            if skipped:
                log(f"[train] moved the unreadable checkpoint(s) {sorted(skipped)} to "
                    f"{self.workdir.checkpoints_unreadable}")
            return step, state
        if skipped:
            raise UnreadableCheckpoints(f"no readable checkpoint in {self.directory}: "
                                        + "; ".join(f"step {k}: {v}" for k, v in skipped.items())[:1000]
                                        + " (remove the directory, or use a new --workdir, to start afresh)")
        return None, None

    def _move_aside(self, step: int):
        """Out of the manager's directory, so a new save of that step is not skipped and orbax no longer lists it."""
        if jax.process_index() == 0:
            target = self.workdir.checkpoints_unreadable
            target.mkdir(parents=True, exist_ok=True)
            destination, n = target / f"{step}", 1
            while destination.exists():
                destination, n = target / f"{step}.{n}", n + 1
            (self.directory / str(step)).rename(destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"var_jax checkpoint {step} moved aside")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def check_finite(state, what: str):
    """Raise NonFiniteError unless every parameter of `state` is finite (one fused reduction on the device)."""
    if not bool(_all_finite(state.params)):
        raise NonFiniteError(f"refusing to write the {what}: it holds a non-finite parameter")


class BestModel:
    """Keeps WORKDIR/best_model: the exported model of the evaluation with the lowest `metric` so far (see the
    module docstring). `export(state, directory)` is the stage's model export."""

    def __init__(self, workdir, metric: str, export):
        workdir = Workdir.at(workdir)
        self.directory, self.record = workdir.best_model, workdir.best_model_record
        self.metric, self.export = metric, export
        self.best = json.loads(self.record.read_text())["value"] if self.record.exists() else None

    def update(self, step: int, metrics: dict, state) -> bool:
        """Export `state` when metrics[metric] beats the best so far; returns whether it did. Every process
        decides alike (the same metrics and record), so the export's collective save runs on all of them."""
        value = float(metrics[self.metric])
        if not math.isfinite(value) or (self.best is not None and value >= self.best):
            return False
        check_finite(state, f"best model at step {step}")
        self.export(state, self.directory)
        if jax.process_index() == 0:
            atomic_write_text(self.record, json.dumps({"step": int(step), "metric": self.metric, "value": value,
                                                       "metrics": metrics}, indent=2, sort_keys=True) + "\n")
        self.best = value
        return True
