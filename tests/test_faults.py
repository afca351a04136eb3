"""Training faults (issue 8): non-finite steps, unreadable checkpoints, SIGTERM, the resume guard, unreadable
images. Tiny VAR runs (depth 1, width 64, 16 px, patch_nums (1,2,3,4)) through the real `train` command; the runs
share a persistent compilation cache, so only the first one compiles."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from var_jax.cli import main

STEPS = 6


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax_cache")
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield path
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def train_args(workdir, tokenizer, *extra, steps=STEPS):
    return ["train", "--config", str(REPO_ROOT / "configs/digits_var.py") + ":depth=1,width=64,batch=8,image_size=16",
            "--workdir", str(workdir), f"--config.tokenizer_checkpoint={tokenizer}", "--config.patch_nums=(1,2,3,4)",
            f"--config.total_steps={steps}", "--config.log_every=1", "--config.checkpoint_every=1",
            "--config.keep_checkpoints=20", "--config.sample_every=0", *extra]


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def losses(workdir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records(workdir)]


def saved_state(workdir, step):
    """The raw arrays of a checkpoint's train state (no target: numpy as saved)."""
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokenizer_dir, cache_dir):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_args(workdir, tokenizer_dir)) == 0
    return workdir


# Images travel as uint8 and cannot be NaN; their conversion to floats inside the step can. A batch whose every
# pixel is this value (no real batch is one flat grey) converts to NaN under poison_batches.
POISON = 7


def poison_batches(monkeypatch, bad_steps):
    """Batches at the given 1-based steps become NaN images inside the train step: a non-finite input reaches the
    step where it can still arise (the on-device conversion, patched here to turn POISON batches into NaN)."""
    from var_jax.train import trainer
    from var_jax.train.var import step
    real, convert = trainer.build_data, step.to_model_range_on_device
    monkeypatch.setattr(step, "to_model_range_on_device",
                        lambda images: jnp.where(jnp.all(images == POISON), jnp.nan, convert(images)))

    def build_data(config):
        iterator, held_out, classes = real(config)
        plain_next, count = type(iterator).__next__, [0]

        def poisoned_next(self):
            batch, count[0] = plain_next(self), count[0] + 1
            if count[0] in bad_steps:
                batch = {**batch, "image": np.full_like(batch["image"], POISON)}
            return batch
        # same grain iterator (its checkpointing is unchanged), with a poisoning __next__
        iterator.__class__ = type("Poisoned", (type(iterator),), {"__next__": poisoned_next})
        return iterator, held_out, classes
    monkeypatch.setattr(trainer, "build_data", build_data)


def test_nonfinite_steps_change_nothing_and_are_counted(tmp_path, tokenizer_dir, straight, monkeypatch):
    poison_batches(monkeypatch, {3, 4})
    assert main(train_args(tmp_path, tokenizer_dir, "--config.data.worker_count=0")) == 0
    got = records(tmp_path)
    assert [r["skipped_steps"] for r in got] == [0, 0, 1, 2, 2, 2]
    assert [r["nonfinite_run"] for r in got] == [0, 0, 1, 2, 0, 0]
    # (the VAR loss of a NaN image batch is finite: the frozen tokenizer maps NaN to valid tokens; the batch
    # check of state.finish_step is what drops these updates)
    assert losses(tmp_path)[:2] == losses(straight)[:2]
    two, four = saved_state(tmp_path, 2), saved_state(tmp_path, 4)
    assert_trees_equal(two["params"], four["params"])          # params and optimizer state kept bit for bit
    assert_trees_equal(two["opt_state"], four["opt_state"])
    assert int(four["step"]) == 4 and int(four["counters"]["skipped_steps"]) == 2
    five = saved_state(tmp_path, 5)
    assert not np.array_equal(five["params"]["head"]["kernel"], four["params"]["head"]["kernel"])
    assert (tmp_path / "model" / "config.json").is_file()


def test_max_nonfinite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, tokenizer_dir, straight, monkeypatch,
                                                                   capsys):
    poison_batches(monkeypatch, set(range(2, 100)))
    with pytest.raises(SystemExit) as stop:
        # log_every large: the counter is read one step late, the message still names the step that hit the limit
        main(train_args(tmp_path, tokenizer_dir, "--config.max_nonfinite_steps=3", "--config.log_every=100",
                        steps=20))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step 4: 3 steps in a row (steps 2-4)" in err and "max_nonfinite_steps=3" in err, err
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) <= 5
    one = saved_state(tmp_path, 1)
    for step in steps:
        state = saved_state(tmp_path, step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
        assert_trees_equal(state["params"], one["params"])


def test_unreadable_latest_checkpoint_falls_back_and_goes_on(tmp_path, tokenizer_dir, straight, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    shutil.rmtree(workdir / "model")
    for step in (STEPS - 1, STEPS):              # resume from STEPS - 2: the last two are unreadable
        for path in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(path.read_bytes()[:7])
    # a save interrupted before its commit (orbax's temporary directory) is not listed at all
    (workdir / "checkpoints" / f"{STEPS + 1}.orbax-checkpoint-tmp-1").mkdir()
    assert main(train_args(workdir, tokenizer_dir)) == 0
    out = capsys.readouterr().out
    assert f"skipping unreadable checkpoint at step {STEPS}" in out
    assert f"skipping unreadable checkpoint at step {STEPS - 1}" in out
    assert f"resuming from step {STEPS - 2}" in out
    assert losses(workdir) == losses(straight)
    assert sorted(p.name for p in (workdir / "checkpoints_unreadable").iterdir()) == [str(STEPS - 1), str(STEPS)]
    assert (workdir / "model" / "config.json").is_file()

    # none readable: one line, no traceback
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and "state" in path.parts:
            path.write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        main(train_args(workdir, tokenizer_dir, steps=STEPS + 2))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("var-jax train: error: no readable checkpoint in") and "Traceback" not in "".join(err)


def test_resume_guard_refuses_another_run_before_writing(tmp_path, tokenizer_dir, straight, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    before = {p: p.read_bytes() for p in (workdir / "train_config.json", workdir / "metrics.jsonl")}
    with pytest.raises(SystemExit) as stop:
        main(train_args(workdir, tokenizer_dir, "--config.seed=1", "--config.optim.b2=0.99"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "run.seed: checkpoint has 0, config has 1" in err and "run.optim.b2" in err
    assert {p: p.read_bytes() for p in before} == before        # nothing overwritten
    # run settings may change: more steps, other intervals, other compute dtype
    assert main(train_args(workdir, tokenizer_dir, "--config.log_every=2", "--config.compute_dtype=float32",
                           steps=STEPS + 2)) == 0
    assert [r["step"] for r in records(workdir)][-1] == STEPS + 2
    # a workdir from before run_config.json (only model_config.json) still resumes, and is guarded from then on
    (workdir / "checkpoints" / "run_config.json").unlink()
    assert main(train_args(workdir, tokenizer_dir, steps=STEPS + 3)) == 0
    assert (workdir / "checkpoints" / "run_config.json").is_file()


def test_unreadable_images_are_skipped_and_counted(tmp_path, tokenizer_dir, cache_dir):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / label / f"{k}.png")
    (root / "a" / "1.png").write_bytes(b"not a png")
    workdir = tmp_path / "run"
    # one grain worker process: the count comes back inside the batches
    assert main(train_args(workdir, tokenizer_dir, "--config.data.name=folder", f"--config.data.path={root}",
                           "--config.data.worker_count=1", "--config.eval_every=0", steps=2)) == 0   # no held-out share
    got = [r["skipped_images"] for r in records(workdir)]
    assert got == [1, 2]                 # 8 files, batch 8: the bad one is met once per epoch


def test_sigterm_saves_exits_and_resumes_to_equal_losses(tmp_path, tokenizer_dir, straight, cache_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "var_jax", *train_args(tmp_path, tokenizer_dir, "--config.checkpoint_every=1000")]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before the signal"
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and time.time() - signalled < 60
    stopped = int(out.split("SIGTERM: checkpoint saved at step ")[1].split(",")[0])
    assert stopped < STEPS and (tmp_path / "checkpoints" / str(stopped)).is_dir()
    assert not (tmp_path / "model").exists()
    resumed = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"resuming from step {stopped}" in resumed.stdout
    assert losses(tmp_path) == losses(straight)
