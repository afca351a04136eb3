"""A training run killed with SIGKILL at a random step and restarted logs the same losses, step for step, as an
uninterrupted run; a restart onto a different mesh continues from the checkpoint; a workdir holding another
model's checkpoints is refused. Runs the real CLI in subprocesses (tiny tokenizer and VAR, digits data)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

STEPS = 8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def train_command(workdir, tokenizer, *extra):
    return [sys.executable, "-m", "var_jax", "train",
            "--config", "configs/digits_var.py:depth=2,width=64,batch=8,image_size=16",
            "--workdir", str(workdir), f"--config.tokenizer_checkpoint={tokenizer}",
            "--config.patch_nums=(1,2,3,4)", f"--config.total_steps={STEPS}", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.sample_every=0", *extra]


def environment(cache, devices=1):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # the three runs compile the same step: share the compilation cache
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def losses(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines)]


def run(cmd, env):
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sigkill_resume_mesh_change_and_config_mismatch(tmp_path, tokenizer_dir, cache_dir):
    env = environment(cache_dir)
    straight = tmp_path / "straight"
    run(train_command(straight, tokenizer_dir), env)
    want = losses(straight)
    assert [s for s, _, _ in want] == list(range(1, STEPS + 1))

    # 1. SIGKILL at a random step (after at least one checkpoint was committed), then rerun: identical losses
    killed = tmp_path / "killed"
    kill_after = random.randint(3, STEPS - 2)      # logged steps before the kill
    proc = subprocess.Popen(train_command(killed, tokenizer_dir), env=env, cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if (metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after
                and any(p.name.isdigit() for p in (killed / "checkpoints").iterdir())):   # one committed
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

    # 2. restore the step-4 checkpoint onto 2 devices with FSDP-sharded parameters: the same run continues
    moved = tmp_path / "moved"
    shutil.copytree(straight, moved)
    for step_dir in (moved / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 4:
            shutil.rmtree(step_dir)
    out = run(train_command(moved, tokenizer_dir, "--config.mesh=(1,2,1)"), environment(cache_dir, devices=2))
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
