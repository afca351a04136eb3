"""The training loop, for either stage; reads top to bottom as the story of a run:
config -> mesh -> data -> stage (models, optimizer, step) -> restore or init -> loop (step, held-out evaluation,
log, checkpoint, sample) -> final checkpoint and exported model directory (WORKDIR/model).

A workdir (train/workdir.py: its layout and writers, local or gs://) holds train_config.json (the run's whole
config; workdirs from before it was named so hold it as config.json, the name a *model* directory uses for its own
config), the metrics, tensorboard/, checkpoints/, samples/, model/ once finished, and best_model/ +
best_model.json with held-out evaluation on. The user's path is resolved once, here; every writer asks the Workdir.

Held-out evaluation (train/held_out.py): every `eval_every` steps and at the last step, before that step's
checkpoint, the stage evaluates on the whole held-out split; the `val/...` metrics join that step's metrics.jsonl
record and the best model by the stage's metric is kept (checkpointing.BestModel).

Resuming: rerunning with the same workdir continues from the latest readable checkpoint (model, optimizer, step,
RNG, fault counters; the data restarts at global batch `step`, on any number of hosts or grain workers), so the
resumed run sees the same batches and logs the same losses;
a config that would compute something else is refused before anything in the workdir is written
(checkpointing.py). SIGTERM (e.g. a preemption notice) saves a checkpoint at the current step and exits cleanly;
on several processes they agree on the step through JAX's preemption sync point.

Diagnosis (train/diagnosis.py): JAX's persistent compilation cache is on (WORKDIR/compile_cache by default);
`profile_steps` writes a profiler trace to WORKDIR/profiles; each record splits its interval's time into compile,
data wait, checkpoint, evaluation, samples and pure step time, and carries the workdir's goodput over all runs.

Faults: a step with a non-finite loss or gradient keeps the parameters and optimizer state (state.finish_step);
`skipped_steps` counts them in metrics.jsonl and `max_nonfinite_steps` of them in a row stop the run with a
NonFiniteError naming the step. The consecutive count is read one step late, so the host never waits for the
step it has just dispatched.
"""
from __future__ import annotations

import signal
import time

import jax
from jax.experimental import multihost_utils

from var_jax.data.pipeline import TrainBatches, make_eval_dataset
from var_jax.data.sources import build_train_and_held_out
from var_jax.images import image_grid, save_grid, to_uint8
from var_jax.paths import atomic_write_text
from var_jax.mesh import ONE_SLICE, dcn_mesh_shape, make_mesh
from var_jax.sharding import set_logical_axis_rules
from var_jax.train.checkpointing import BestModel, TrainCheckpointer, check_finite, run_identity
from var_jax.train.diagnosis import ProfileWindow, StepClock, configure_compile_cache, parse_profile_steps
from var_jax.train.held_out import eval_settings
from var_jax.train.logging import MetricLogger
from var_jax.train.stage import ConfigError, NonFiniteError, Stage, check_positive
from var_jax.train.tokenizer.stage import build_tokenizer_stage
from var_jax.train.var.stage import build_var_stage
from var_jax.train.workdir import Workdir, read_metrics

# config.stage -> the function building the Stage (config, mesh, dataset_classes) -> Stage.
STAGE_BUILDERS = {"var": build_var_stage, "tokenizer": build_tokenizer_stage}


def validate_config(config):
    """Checks that need no model or data: fail fast, naming the field."""
    if config.stage not in STAGE_BUILDERS:
        raise ConfigError(f"stage: must be one of {sorted(STAGE_BUILDERS)}, got {config.stage!r}")
    check_positive(config, "total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints")
    if "max_nonfinite_steps" in config:
        check_positive(config, "max_nonfinite_steps")
    if int(config.sample_every) < 0:
        raise ConfigError(f"sample_every: must be >= 0, got {config.sample_every}")
    eval_settings(config)
    parse_profile_steps(config.get("profile_steps", ""))


def build_mesh(config):
    """The device mesh (config.mesh within each slice, config.mesh_dcn across slices); config.sharding_rules
    become this run's logical-axis table (var_jax/sharding.py)."""
    try:
        set_logical_axis_rules(config.get("sharding_rules", ()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"sharding_rules: {e}") from None
    try:
        dcn = dcn_mesh_shape(tuple(config.get("mesh_dcn", ONE_SLICE)))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"mesh_dcn: {e}") from None
    try:
        return make_mesh(tuple(config.mesh), dcn=dcn)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"mesh: {e}") from None


def build_data(config):
    """(iterator over this host's training batches, the held-out dataset or None, number of classes) from
    `config.data`: the training split never holds a held-out image (data/sources.build_train_and_held_out). The
    iterator starts at global batch 0 unless told otherwise (`start_at(step)`) before its first batch."""
    data = {k: v for k, v in config.data.to_dict().items()}
    evaluation = eval_settings(config)
    try:
        source, held_out, num_classes = build_train_and_held_out(
            {k: v for k, v in data.items() if v not in ("", None)}, held_out=bool(evaluation.every))
        batches = TrainBatches(source, image_size=int(data["image_size"]), global_batch_size=int(config.batch_size),
                               seed=int(config.seed), train=True, hflip=bool(data.get("hflip", False)),
                               worker_count=int(data.get("worker_count", 0)))
        if held_out is not None:
            held_out = make_eval_dataset(held_out, image_size=int(data["image_size"]),
                                         global_batch_size=evaluation.batch_size)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        raise ConfigError(f"data: {e}") from None
    return batches, held_out, num_classes


def build_stage(config, mesh, num_classes) -> Stage:
    return STAGE_BUILDERS[config.stage](config, mesh, num_classes)


class _Preemption:
    """Whether to checkpoint and stop after the current step because of a preemption notice (SIGTERM).

    One process: a SIGTERM handler sets a flag. Several processes (jax.distributed): JAX's preemption service
    catches the signal on whichever host gets it and `reached_preemption_sync_point(step)` becomes true on every
    host at the same step, with no collective on ordinary steps; our own handler is then not installed, since it
    would replace JAX's."""
    def __init__(self):
        self.requested = False
        self.multi_process = jax.process_count() > 1
        self._previous = None if self.multi_process else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if not self.multi_process:
            return self.requested
        return multihost_utils.reached_preemption_sync_point(step)

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _NonFiniteWatch:
    """Stops the run after `limit` non-finite steps in a row, from the state's `nonfinite_run` counter. The
    counter of step k is read after step k+1 is dispatched (or at once when the host syncs anyway), so the
    device never idles waiting for the host."""
    def __init__(self, limit: int):
        self.limit = limit
        self.pending = None

    def check(self, step: int, metrics: dict | None, now: bool = False):
        items, self.pending = [self.pending], None
        current = (step, metrics["nonfinite_run"]) if metrics is not None else None
        if now:
            items.append(current)
        else:
            self.pending = current
        for item in items:
            if item is None:
                continue
            done, run = item[0], int(item[1])
            if run >= self.limit:
                raise NonFiniteError(
                    f"step {done}: {run} steps in a row (steps {done - run + 1}-{done}) had a non-finite loss or "
                    f"gradient (max_nonfinite_steps={self.limit}); their updates were dropped, so the "
                    "checkpoints hold the last finite parameters; check the learning rate and the data")


def train(config, workdir) -> dict:
    """Run (or resume) training; returns the last logged metrics."""
    clock = StepClock()                  # splits this run's time by kind (train/diagnosis.py)
    workdir = Workdir.at(workdir)
    validate_config(config)
    mesh = build_mesh(config)
    data_iter, held_out, num_classes = build_data(config)
    stage = build_stage(config, mesh, num_classes)
    eval_every = eval_settings(config).every if stage.evaluate is not None else 0

    # The resume guard runs before anything in the workdir is written (train_config.json, metrics.jsonl).
    checkpointer = TrainCheckpointer(workdir, keep=int(config.keep_checkpoints), model_config=stage.model_config,
                                     run_config=run_identity(config))
    try:
        checkpointer.check_model_config()
        # after the guard (the cache's first use creates its directory), before init and the steps compile
        configure_compile_cache(config.get("compile_cache_dir", ""), workdir.compile_cache)
        with jax.set_mesh(mesh):
            start, state = checkpointer.restore_latest(stage.layout.abstract, log=_print0)
            if start is None:
                start, state = 0, stage.init()
        data_iter.start_at(start)          # one global batch per step: the data position is the step
    except BaseException:
        checkpointer.close()
        raise
    if jax.process_index() == 0:
        atomic_write_text(workdir.train_config, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    total = int(config.total_steps)
    if jax.process_index() == 0:         # the time sums go on from the stored records, read before any is cut
        clock.resume_from(read_metrics(workdir), start)
    logger = MetricLogger(workdir, total_steps=total, start_step=start, batch_size=int(config.batch_size),
                          tokens_per_example=stage.tokens_per_example, flops_per_example=stage.flops_per_example,
                          peak_flops=float(config.get("peak_flops", 0.0)) * jax.device_count() or None)
    if start == 0 and jax.process_index() == 0:
        print(f"[train] {stage.describe}; mesh {dict(mesh.shape)}; {total} steps", flush=True)
    elif jax.process_index() == 0:
        print(f"[train] resuming from step {start} of {total}", flush=True)

    best = BestModel(workdir, stage.best_metric, stage.export) if eval_every else None
    preemption = _Preemption()
    nonfinite = _NonFiniteWatch(int(config.get("max_nonfinite_steps", 20)))
    profiler = ProfileWindow(config.get("profile_steps", ""), workdir.profiles, clock)
    last = {}
    step = start
    clock.begin_loop(start)
    try:
        with jax.set_mesh(mesh):
            while step < total:
                profiler.before_step(step + 1)
                with profiler.annotate(step + 1):
                    with clock.measure("data_wait"):
                        batch = stage.make_batch(next(data_iter), step)
                    state, metrics = stage.step_fn(step)(state, batch, stage.frozen)
                step += 1
                profiler.after_step(step, state)
                logger.tick()
                stop = preemption.reached(step)
                eval_now = bool(eval_every) and (step % eval_every == 0 or step == total)
                save_now = step % int(config.checkpoint_every) == 0 or step == total or stop
                # a checkpointed step always has its record: a resumed run continues its time sums exactly
                log_now = step % int(config.log_every) == 0 or step == total or eval_now or save_now
                nonfinite.check(step, metrics, now=log_now)   # logged steps (every saved one too) sync anyway
                if log_now:
                    logged = dict(metrics)
                    if eval_now:   # before the checkpoint: a resumed run never lacks the record of a saved step
                        with clock.measure("eval", wait_for=state):
                            logged.update(_evaluate(stage, state, held_out, step, best, logger))
                    times = clock.lap(step)
                    logged.update(logger.throughput(step, seconds=times["time/step_s"]), **times)
                    last = logger.write(step, logged)
                if stage.sample is not None and step % int(config.sample_every) == 0:
                    with clock.measure("sample", wait_for=state):
                        _write_samples(stage, state, step, workdir, logger)
                if save_now:
                    with clock.measure("checkpoint", wait_for=state):
                        logger.end_window()      # the records of every step the checkpoint holds are stored first
                        checkpointer.save(step, state)
                if stop:
                    _print0(f"[train] SIGTERM: checkpoint saved at step {step}, exiting")
                    break
            nonfinite.check(step, None)
        checkpointer.wait()
        if step == total:
            check_finite(state, "exported model")
            stage.export(state, workdir.model)
    finally:
        profiler.stop()
        preemption.restore()
        checkpointer.close()
        logger.close()
    return last


def _print0(message: str):
    if jax.process_index() == 0:
        print(message, flush=True)


def _evaluate(stage: Stage, state, held_out, step: int, best: BestModel, logger: MetricLogger) -> dict:
    """The held-out metrics of `state` (one pass over `held_out`); keeps the best model."""
    started = time.perf_counter()
    metrics = stage.evaluate(state, iter(held_out))
    best.update(step, metrics, state)
    logger.restart_clock()
    summary = {k: v for k, v in metrics.items() if not any(c.isdigit() for c in k)}   # per-scale: metrics.jsonl
    _print0(f"[train] step {step}: held-out " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in summary.items())
            + f" ({time.perf_counter() - started:.1f} s)")
    return metrics


def _write_samples(stage: Stage, state, step: int, workdir, logger):
    images = stage.sample(state, step)
    if images is None or jax.process_index() != 0:
        return
    images = to_uint8(images)
    workdir.samples.mkdir(parents=True, exist_ok=True)
    save_grid(workdir.samples / f"step_{step:08d}.png", images)
    logger.add_image("samples", image_grid(images), step)
