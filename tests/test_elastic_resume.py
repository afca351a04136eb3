"""Elastic resume: a run checkpointed on P processes with W grain workers resumes on P' processes and W' workers
and logs the losses of an uninterrupted run. The data position is the step (one global batch per step), so no
iterator state is saved; checkpoints from before that (with a per-process `data` item) still resume.

The multi-process runs are launch/local_multiprocess.sh (CPU processes joined by jax.distributed); every run keeps
2 devices in all (2 processes × 1 device or 1 process × 2 devices), so the step computes the same arithmetic and
the losses can be compared exactly. A run killed after its checkpoint k is a copy of a finished run's workdir
without the later checkpoints and model/, which is what SIGKILL leaves (metrics.jsonl is cut back on resume;
tests/test_resume.py kills real runs)."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from var_jax.data.pipeline import TrainBatches, checkpoint_save_args, make_dataset

STEPS = 6
VAR_CONFIG = "configs/digits_var.py:depth=1,width=32,batch=8,image_size=16"
TOKENIZER_CONFIG = str(REPO_ROOT / "configs/digits_tokenizer.py") + ":batch=8,image_size=16"   # run in-process


# ---- the data position is the step ---------------------------------------------------------------------------
class LabelledImages:
    """Example i is a random image labelled i, so a batch shows exactly which examples it holds."""

    def __init__(self, size, rng):
        self.images = rng.integers(0, 256, (size, 10, 12, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": np.int32(index)}


def test_train_batches_started_at_k_are_the_uninterrupted_streams_batches_on_any_host_count():
    rng = np.random.default_rng()
    source = LabelledImages(int(rng.integers(13, 40)), rng)
    global_batch, seed, start = 6, int(rng.integers(1 << 30)), int(rng.integers(1, 12))   # crosses epochs
    settings = dict(image_size=8, global_batch_size=global_batch, seed=seed, num_threads=2)
    uninterrupted = iter(make_dataset(source, shard_index=0, shard_count=1, **settings))
    want = [next(uninterrupted) for _ in range(start + 3)][start:]
    for hosts in (1, 2, 3):
        streams = [TrainBatches(source, shard_index=p, shard_count=hosts, **settings) for p in range(hosts)]
        for stream in streams:
            stream.start_at(start)
        for batch in want:
            got = [next(stream) for stream in streams]
            for key in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), batch[key])
    with pytest.raises(RuntimeError, match="already drawn"):
        streams[0].start_at(0)


def test_a_checkpoint_with_the_old_per_process_data_item_restores_on_another_process_count(tmp_path):
    """What a 2-process run wrote before the position was the step: `state` plus grain's `data` item, one file per
    process. Restoring on this 1-process run reads the state alone."""
    import orbax.checkpoint as ocp

    from var_jax.train.checkpointing import TrainCheckpointer
    from var_jax.train.state import TrainState, zero_counters
    values = np.random.default_rng().normal(size=(4, 3)).astype(np.float32)
    state = TrainState(step=jnp.int32(6), params={"w": jnp.asarray(values)}, opt_state={"mu": jnp.zeros((4, 3))},
                       rng=jax.random.key_data(jax.random.key(0)), counters=zero_counters())
    iterator = iter(make_dataset(LabelledImages(12, np.random.default_rng(0)), image_size=8, global_batch_size=4,
                                 seed=0, shard_index=0, shard_count=1, num_threads=1))
    next(iterator)
    directory = tmp_path / "checkpoints"
    with ocp.CheckpointManager(directory, item_names=("state", "data")) as old:
        old.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=checkpoint_save_args(iterator)))
        old.wait_until_finished()
    data = directory / "6" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")

    checkpointer = TrainCheckpointer(tmp_path, keep=3, model_config={})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
        step, restored = checkpointer.restore_latest(abstract, log=lambda line: pytest.fail(line))
        assert step == 6
        assert int(restored.step) == 6
        np.testing.assert_array_equal(restored.params["w"], values)
        assert checkpointer.save(7, restored)                 # and it saves on as the new format: state alone
        checkpointer.wait()
        assert sorted(p.name for p in (directory / "7").iterdir() if p.is_dir()) == ["state"]
    finally:
        checkpointer.close()


# ---- real runs: other process counts and worker counts -------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def train_args(config, workdir, *extra):
    return ["--config", config, "--workdir", str(workdir), f"--config.total_steps={STEPS}", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.keep_checkpoints=20", "--config.sample_every=0",
            "--config.eval_every=0", *extra]


def var_args(workdir, tokenizer, *extra):
    return train_args(VAR_CONFIG, workdir, f"--config.tokenizer_checkpoint={tokenizer}",
                      "--config.patch_nums=(1,2,3,4)", *extra)


def tokenizer_args(workdir, *extra):
    # 16 px with downsampling 4: the 4x4 latent of patch_nums (1,2,3,4)
    return train_args(TOKENIZER_CONFIG, workdir, "--config.tokenizer.ch_mult=(1,2,2)",
                      "--config.tokenizer.vocab_size=64", *extra)


def command(processes, args, cache, log_dir):
    """(argv, env) of a training run on `processes` CPU processes with 2 devices in all."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        return [sys.executable, "-m", "var_jax", "train", *args], env
    env.update(NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS=str(2 // processes), LOG_DIR=str(log_dir),
               PORT=str(13000 + random.randrange(2000)), PYTHON=sys.executable)
    return ["bash", "launch/local_multiprocess.sh", *args], env


def run(processes, args, cache, log_dir):
    argv, env = command(processes, args, cache, log_dir)
    proc = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def committed_steps(workdir):
    directory = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def keep_checkpoints_up_to(source, destination, step):
    """A copy of workdir `source` as a run killed just after its checkpoint `step` committed would leave it."""
    shutil.copytree(source, destination)
    shutil.rmtree(destination / "model")
    for later in committed_steps(destination):
        if later > step:
            shutil.rmtree(destination / "checkpoints" / str(later))


def losses(workdir):
    records = map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def resumed_from(stdout):
    marker = "resuming from step "
    assert marker in stdout, stdout[-2000:]
    return int(stdout.split(marker)[1].split()[0])


def test_var_run_resumes_on_another_process_count_and_worker_count(tmp_path, tokenizer_dir, cache_dir):
    """1 process with W=2, uninterrupted; its checkpoint resumed on 2 processes with W=0; a checkpoint of that run
    resumed on 1 process with W=2. Both log the uninterrupted run's losses, bit for bit."""
    straight = tmp_path / "straight"
    run(1, var_args(straight, tokenizer_dir, "--config.data.worker_count=2"), cache_dir, tmp_path)
    want = losses(straight)
    assert [s for s, _, _ in want] == list(range(1, STEPS + 1))

    # 1 -> 2 processes, 2 -> 0 workers (checkpoints every step from here, for the next resume)
    first = random.choice([s for s in committed_steps(straight) if s < STEPS - 1])
    grown = tmp_path / "grown"
    keep_checkpoints_up_to(straight, grown, first)
    out = run(2, var_args(grown, tokenizer_dir, "--config.checkpoint_every=1"), cache_dir, tmp_path)
    assert resumed_from(out) == first and losses(grown) == want

    # 2 -> 1 processes, 0 -> 2 workers, from a checkpoint the 2-process run wrote
    second = random.randint(first + 1, STEPS - 1)
    shrunk = tmp_path / "shrunk"
    keep_checkpoints_up_to(grown, shrunk, second)
    out = run(1, var_args(shrunk, tokenizer_dir, "--config.data.worker_count=2"), cache_dir, tmp_path)
    assert resumed_from(out) == second and losses(shrunk) == want
    assert (shrunk / "model" / "config.json").is_file()


@pytest.fixture
def in_process_cache(cache_dir):
    """The persistent compilation cache for runs in this process (the resume then loads the compiled step)."""
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_tokenizer_run_resumes_with_another_worker_count(tmp_path, in_process_cache, capsys):
    """The tokenizer stage shares the trainer: W=0, uninterrupted; its checkpoint resumed with W=2. In this process
    (one device), so the two runs compile the tokenizer's step, the slowest to compile, once; process counts are
    the trainer's alike for both stages (above)."""
    from var_jax.cli import main
    straight = tmp_path / "straight"
    assert main(["train", *tokenizer_args(straight)]) == 0
    want = losses(straight)
    assert [s for s, _, _ in want] == list(range(1, STEPS + 1))
    step = random.choice([s for s in committed_steps(straight) if s < STEPS])
    resumed = tmp_path / "resumed"
    keep_checkpoints_up_to(straight, resumed, step)
    capsys.readouterr()
    assert main(["train", *tokenizer_args(resumed, "--config.data.worker_count=2")]) == 0
    assert resumed_from(capsys.readouterr().out) == step and losses(resumed) == want
    assert (resumed / "model" / "config.json").is_file()
