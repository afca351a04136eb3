"""Resuming a training run logs the same losses, step for step, as an uninterrupted run: after SIGKILL at a random
step, on another mesh, on another number of processes (launch/local_multiprocess.sh: CPU processes joined by
jax.distributed) and with another `data.worker_count`; a workdir holding another model's checkpoints is refused.
The data position is the step (one global batch per step), so no iterator state is saved, and checkpoints from
before that (with a per-process `data` item) still resume. Runs the real CLI (tiny tokenizer and VAR, digits).

Every VAR run has 2 devices in all (1 process × 2 devices or 2 processes × 1 device): with the same mesh the step
is the same arithmetic, so the losses compare bit for bit. A run killed after its checkpoint k is also made as a
copy of a finished run's workdir without the later checkpoints and model/, which is what SIGKILL leaves
(metrics.jsonl is cut back on resume)."""
import json
import os
import random
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

from conftest import REPO_ROOT
from var_jax.data.pipeline import TrainBatches, checkpoint_save_args, make_dataset

STEPS = 8
TOKENIZER_STEPS = 6


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One persistent compilation cache for the module's runs: those on the same devices compile once."""
    return tmp_path_factory.mktemp("jax_cache")


def train_command(workdir, tokenizer, *extra):
    return [sys.executable, "-m", "var_jax", "train", *var_args(workdir, tokenizer, *extra)]


def var_args(workdir, tokenizer, *extra):
    return ["--config", "configs/digits_var.py:depth=2,width=64,batch=8,image_size=16",
            "--workdir", str(workdir), f"--config.tokenizer_checkpoint={tokenizer}",
            "--config.patch_nums=(1,2,3,4)", f"--config.total_steps={STEPS}", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.keep_checkpoints=20", "--config.sample_every=0", *extra]


def environment(cache, devices=2):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def two_processes(args, cache, log_dir):
    """(argv, env) of launch/local_multiprocess.sh: 2 CPU processes × 1 device."""
    env = dict(environment(cache), NUM_PROCESSES="2", DEVICES_PER_PROCESS="1", LOG_DIR=str(log_dir),
               PORT=str(13000 + random.randrange(2000)), PYTHON=sys.executable)
    return ["bash", "launch/local_multiprocess.sh", *args], env


def losses(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines)]


def run(cmd, env):
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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


def resumed_from(stdout):
    marker = "resuming from step "
    assert marker in stdout, stdout[-2000:]
    return int(stdout.split(marker)[1].split()[0])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokenizer_dir, cache_dir):
    """The uninterrupted run: 1 process × 2 devices, 2 grain workers."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    run(train_command(workdir, tokenizer_dir, "--config.data.worker_count=2"), environment(cache_dir))
    assert [s for s, _, _ in losses(workdir)] == list(range(1, STEPS + 1))
    return workdir


def test_sigkill_resume_mesh_change_and_config_mismatch(tmp_path, tokenizer_dir, cache_dir, straight):
    env = environment(cache_dir)
    want = losses(straight)

    # 1. SIGKILL at a random step (after at least one checkpoint was committed), then rerun: identical losses
    killed = tmp_path / "killed"
    kill_after = random.randint(3, STEPS - 2)      # logged steps before the kill
    proc = subprocess.Popen(train_command(killed, tokenizer_dir), env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after and committed_steps(killed):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(killed)) < STEPS

    out = run(train_command(killed, tokenizer_dir), env)
    assert "resuming from step" in out.stdout
    assert losses(killed) == want                   # bitwise: same batches, keys and arithmetic
    assert (killed / "model" / "config.json").is_file()

    # 2. restore the step-4 checkpoint with FSDP-sharded parameters (mesh (1,2,1)): the same run continues, up to
    # float32 rounding (the parameters' reductions are split otherwise)
    moved = tmp_path / "moved"
    keep_checkpoints_up_to(straight, moved, 4)
    out = run(train_command(moved, tokenizer_dir, "--config.mesh=(1,2,1)"), env)
    assert "resuming from step 4" in out.stdout
    got = losses(moved)
    assert got[:4] == want[:4] and [s for s, _, _ in got] == list(range(1, STEPS + 1))
    for (_, loss, gnorm), (_, loss_want, gnorm_want) in zip(got[4:], want[4:]):
        assert loss == pytest.approx(loss_want, rel=1e-5) and gnorm == pytest.approx(gnorm_want, rel=1e-4)

    # 3. a config with another model is refused, naming the field
    bad = subprocess.run(train_command(straight, tokenizer_dir, "--config.model.width=128", "--config.model.heads=2"),
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "different model" in bad.stderr and "var.width" in bad.stderr


def test_resume_on_another_process_count_and_worker_count(tmp_path, tokenizer_dir, cache_dir, straight):
    """1 process, W=2 (the uninterrupted run) -> 2 processes, W=0 -> 1 process, W=2, each from a random checkpoint
    of the run before: the uninterrupted losses, bit for bit."""
    want = losses(straight)
    first = random.choice([s for s in committed_steps(straight) if s < STEPS - 1])
    grown = tmp_path / "grown"
    keep_checkpoints_up_to(straight, grown, first)
    # checkpoints every step from here, for the next resume to choose from
    out = run(*two_processes(var_args(grown, tokenizer_dir, "--config.checkpoint_every=1"), cache_dir, tmp_path))
    assert resumed_from(out.stdout) == first and losses(grown) == want

    second = random.randint(first + 1, STEPS - 1)
    shrunk = tmp_path / "shrunk"
    keep_checkpoints_up_to(grown, shrunk, second)
    out = run(train_command(shrunk, tokenizer_dir, "--config.data.worker_count=2"), environment(cache_dir))
    assert resumed_from(out.stdout) == second and losses(shrunk) == want
    assert (shrunk / "model" / "config.json").is_file()


@pytest.fixture
def in_process_cache(cache_dir):
    """The module's compilation cache for runs in this process."""
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def tokenizer_args(workdir, *extra):
    # 16 px with downsampling 4: the 4x4 latent of patch_nums (1,2,3,4)
    return ["--config", str(REPO_ROOT / "configs/digits_tokenizer.py") + ":batch=8,image_size=16",
            "--workdir", str(workdir), f"--config.total_steps={TOKENIZER_STEPS}", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.sample_every=0", "--config.eval_every=0",
            "--config.tokenizer.ch_mult=(1,2,2)", "--config.tokenizer.vocab_size=64", *extra]


def test_tokenizer_stage_resumes_with_another_worker_count(tmp_path, in_process_cache, capsys):
    """The tokenizer stage shares the trainer: W=0, uninterrupted; a random checkpoint of it resumed with W=2.
    In this process (one device), so its step, the slowest of the two stages to compile, compiles once."""
    from var_jax.cli import main
    uninterrupted = tmp_path / "straight"
    assert main(["train", *tokenizer_args(uninterrupted)]) == 0
    want = losses(uninterrupted)
    assert [s for s, _, _ in want] == list(range(1, TOKENIZER_STEPS + 1))
    step = random.choice([s for s in committed_steps(uninterrupted) if s < TOKENIZER_STEPS])
    resumed = tmp_path / "resumed"
    keep_checkpoints_up_to(uninterrupted, resumed, step)
    capsys.readouterr()
    assert main(["train", *tokenizer_args(resumed, "--config.data.worker_count=2")]) == 0
    assert resumed_from(capsys.readouterr().out) == step and losses(resumed) == want
    assert (resumed / "model" / "config.json").is_file()


# ---- the data position is the step ---------------------------------------------------------------------------
class LabelledImages:
    """Example i is a random image labelled i, so a batch shows exactly which examples it holds."""

    def __init__(self, size, rng):
        self.images = rng.integers(0, 256, (size, 10, 12, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": np.int32(index)}


def test_batches_started_at_k_are_the_uninterrupted_streams_on_any_host_count():
    rng = np.random.default_rng()
    source = LabelledImages(int(rng.integers(13, 40)), rng)
    start = int(rng.integers(1, 12))                     # past the first epoch for the smaller sources
    settings = dict(image_size=8, global_batch_size=6, seed=int(rng.integers(1 << 30)), num_threads=2)
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
    process. This 1-process run reads the state alone, and saves on without a `data` item."""
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
        step, restored = checkpointer.restore_latest(abstract, log=pytest.fail)
        assert step == 6 and int(restored.step) == 6
        np.testing.assert_array_equal(restored.params["w"], values)
        assert checkpointer.save(7, restored)
        checkpointer.wait()
        assert sorted(p.name for p in (directory / "7").iterdir() if p.is_dir()) == ["state"]
    finally:
        checkpointer.close()
