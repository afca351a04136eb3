"""Diagnosis (train/diagnosis.py): the profiler window, the persistent compilation cache and the time accounting
with goodput across restarts. The clock is checked against sleeps and a fresh compile; a tiny digits VAR run
(depth 1, 16 px, patch_nums (1,2,3,4)) through the real `train` command writes a trace, fills the cache that its
resumed run then reads, and logs the time fields and a goodput that continues across the resume."""
import json
import random
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from var_jax.cli import main
from var_jax.train import diagnosis
from var_jax.train.stage import ConfigError

TIME_KINDS = [f"time/{kind}_s" for kind in diagnosis.KINDS]


@pytest.fixture
def jax_cache_config():
    """The compilation cache settings as they were: a run points JAX's cache at its workdir for the process."""
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    ours = diagnosis._ours["dir"]        # an earlier run in this process may have pointed the cache at its workdir
    yield
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()
    for name, value in before.items():
        jax.config.update(name, value)
    diagnosis._ours["dir"] = ours


def test_profile_steps_are_parsed_or_refused_naming_the_field():
    assert diagnosis.parse_profile_steps("") is None
    start = random.randint(1, 1000)
    assert diagnosis.parse_profile_steps(f" {start}:{start + 5} ") == (start, start + 5)
    for bad in ("5", "5:5", "6:5", "0:3", "a:b", "2:3:4", "-1:2"):
        with pytest.raises(ConfigError, match=r"^profile_steps: expected 'START:END'"):
            diagnosis.parse_profile_steps(bad)


def test_compile_cache_setting_picks_the_directory(tmp_path, jax_cache_config):
    jax.config.update("jax_compilation_cache_dir", None)
    first, second = tmp_path / "a" / "compile_cache", tmp_path / "b" / "compile_cache"
    assert diagnosis.configure_compile_cache("", first) == str(first) == jax.config.jax_compilation_cache_dir
    assert jax.config.jax_persistent_cache_min_compile_time_secs == diagnosis.MIN_COMPILE_TIME_S
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == diagnosis.MIN_ENTRY_SIZE_BYTES
    # a second run in the same process moves the cache to its own workdir; an explicit directory wins
    assert diagnosis.configure_compile_cache("", second) == str(second) == jax.config.jax_compilation_cache_dir
    mine = tmp_path / "explicit"
    assert diagnosis.configure_compile_cache(str(mine), second) == str(mine) == jax.config.jax_compilation_cache_dir
    assert diagnosis.configure_compile_cache("None", second) is None and not jax.config.jax_enable_compilation_cache
    assert diagnosis.configure_compile_cache("", second) == str(second) and jax.config.jax_enable_compilation_cache
    # a cache the user configured for JAX (JAX_COMPILATION_CACHE_DIR, jax.config) is kept, with its settings
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    assert diagnosis.configure_compile_cache("", first) == str(tmp_path / "users")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert not first.exists() and not second.exists()       # nothing compiled: no directory made


def test_step_clock_splits_time_by_kind_and_continues_the_sums():
    clock = diagnosis.StepClock()
    clock.resume_from([{"step": 4, "time/productive_s": 3.0, "time/wall_s": 10.0},
                       {"step": 6, "time/productive_s": 4.0, "time/wall_s": 14.0},    # killed run, past the ckpt
                       {"step": 7}], start_step=5)
    assert (clock.base_productive, clock.base_wall) == (3.0, 14.0)
    naps = {kind: random.uniform(0.03, 0.08) for kind in ("data_wait", "checkpoint", "sample")}
    started = time.perf_counter()
    clock.begin_loop(5)
    for kind, nap in naps.items():
        with clock.measure(kind, wait_for=jnp.ones(3)):
            time.sleep(nap)
    width = random.randint(200, 300)     # a shape nothing compiled before: this compile cannot be a cache hit
    with clock.measure("eval"):
        fresh = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
        fresh(jnp.ones((width, width + 1))).block_until_ready()
    time.sleep(0.05)                     # outside every phase: step time
    record = clock.lap(7)
    elapsed = time.perf_counter() - started
    for kind, nap in naps.items():
        assert nap <= record[f"time/{kind}_s"] < nap + 0.05, kind
    assert record["time/compile_s"] > 0 and record["time/eval_s"] < 0.05 + record["time/compile_s"]
    parts = sum(record[k] for k in TIME_KINDS) + record["time/step_s"]
    assert parts == pytest.approx(record["time/wall_s"] - 14.0, abs=0.02) and parts <= elapsed + 0.02
    assert 0.05 <= record["step_time_s"] * 2 == record["time/step_s"] < elapsed
    assert record["time/productive_s"] == pytest.approx(3.0 + record["time/step_s"])
    assert record["goodput"] == pytest.approx(record["time/productive_s"] / record["time/wall_s"])
    assert 0 < record["goodput"] <= 1


def _train(workdir, tokenizer, *extra, steps):
    return main(["train", "--config", str(REPO_ROOT / "configs/digits_var.py") + ":depth=1,width=64,batch=8,"
                 "image_size=16", "--workdir", str(workdir), f"--config.tokenizer_checkpoint={tokenizer}",
                 "--config.patch_nums=(1,2,3,4)", f"--config.total_steps={steps}", "--config.log_every=1",
                 "--config.checkpoint_every=2", "--config.sample_every=0", "--config.eval_every=0", *extra])


def _records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_traces_caches_compiles_and_keeps_goodput_across_a_resume(tmp_path, tokenizer_dir,
                                                                          jax_cache_config):
    workdir = tmp_path / "run"
    jax.clear_caches()                   # earlier tests in this process may have compiled the same step in memory
    assert _train(workdir, tokenizer_dir, "--config.profile_steps=2:3", steps=4) == 0
    traces = list((workdir / "profiles" / "process_0").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    entries = {p.name for p in (workdir / "compile_cache").iterdir() if p.name.endswith("-cache")}
    assert any(name.startswith("jit_train_step") for name in entries), entries
    first = _records(workdir)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert first[0]["time/compile_s"] > 0 and first[0]["time/startup_s"] > 0 and first[1]["time/profile_s"] > 0

    # as if killed after step 4's record, before its checkpoint committed: resume from step 2 in a new workdir
    # that shares the first one's compilation cache
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns("compile_cache", "profiles", "model"))
    shutil.rmtree(resumed / "checkpoints" / "4")
    jax.clear_caches()                   # as a new process would: nothing compiled in memory
    assert _train(resumed, tokenizer_dir, f"--config.compile_cache_dir={workdir / 'compile_cache'}", steps=4) == 0
    records = _records(resumed)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[:2] == first[:2]
    assert sum(r["compile_cache_hits"] for r in records[2:]) >= 1          # the train step came from the cache
    for record in first + records:
        assert all(record[k] >= 0 for k in TIME_KINDS + ["time/step_s", "step_time_s"])
        assert record["step_time_s"] == pytest.approx(record["time/step_s"])        # one step per record
        assert 0 < record["goodput"] <= 1
        assert record["goodput"] == pytest.approx(record["time/productive_s"] / record["time/wall_s"])
    # productive time goes on from the restored step's record; wall time from the last record the lost run stored
    assert records[2]["time/productive_s"] == pytest.approx(first[1]["time/productive_s"] + records[2]["time/step_s"])
    assert records[2]["time/wall_s"] > first[3]["time/wall_s"] + records[2]["time/startup_s"]
    np.testing.assert_allclose(np.diff([r["time/productive_s"] for r in records]),
                               [r["time/step_s"] for r in records[1:]], rtol=1e-6)
    # the lost steps and the restart count as unproductive time (goodput itself can rise when the resumed run's
    # cached compiles are cheaper than the first run's, so compare the time that went unused instead)
    lost = first[3]["time/productive_s"] - first[1]["time/productive_s"]
    unused = [r["time/wall_s"] - r["time/productive_s"] for r in (first[3], records[3])]
    assert unused[1] >= unused[0] + lost + records[2]["time/startup_s"] - 1e-6
