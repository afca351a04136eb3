"""Shared test helpers: the reference fixtures recorded from the original PyTorch VAR, and the session's compiler
settings.

The fixtures live in ../shared/fixtures from the repo root (override with VAR_JAX_FIXTURES). Where they are
absent the tests that need them skip with the reason, except under CI=true, where absence is a failure.

Compiling is most of the suite's time (tiny models, a few steps each), so the session
  - compiles XLA:CPU kernels at LLVM's lowest optimization level (FAST_COMPILE_FLAG, in XLA_FLAGS before JAX
    starts: the test process and every subprocess get it; an XLA_FLAGS that chooses a level is kept);
  - keeps one persistent compilation cache for the session: this process's and every subprocess's
    (`python -m var_jax train ...`, the multi-device checks; through os.environ), so a program compiled once, by
    any test, is read back by every later one that builds it again. The train command keeps a cache configured
    this way (train/diagnosis.py); tests/test_diagnosis.py, which checks the command's own choice of cache, turns
    the session's off while it runs.
"""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Measured here: a tiny VAR train step compiles in 10 s of CPU instead of 24, the GAN tokenizer's in 28 instead of
# 44; the kernels run up to ~3x slower, which the tests' few steps do not feel. The HLO is optimised as before,
# and runs that are compared with each other get the same flags (subprocess_env, device_flags).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

import var_jax  # noqa: E402,F401  (sets its CPU XLA flags before any test starts JAX's backend)

import jax  # noqa: E402

if not jax.config.jax_compilation_cache_dir:      # one the user chose (JAX_COMPILATION_CACHE_DIR) is kept
    SESSION_COMPILE_CACHE = tempfile.mkdtemp(prefix="var_jax_tests_compile_cache_")
    atexit.register(shutil.rmtree, SESSION_COMPILE_CACHE, ignore_errors=True)
    # every program is worth keeping: the suite's compiles are small and many recur (the same tiny configs)
    jax.config.update("jax_compilation_cache_dir", SESSION_COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=SESSION_COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(os.environ.get("VAR_JAX_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
FIXTURE_NAMES = ("tiny", "tiny_stress", "small_shared")


def fixture_path(name: str) -> Path:
    path = FIXTURES_DIR / f"{name}.npz"
    if not path.exists():
        message = f"reference fixture {path} not found (set VAR_JAX_FIXTURES)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


_CACHE = {}


def load_fixture(name: str):
    """(arrays, config) of a fixture file; arrays is a dict of numpy arrays, loaded once per session."""
    if name not in _CACHE:
        with np.load(fixture_path(name), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        _CACHE[name] = (arrays, json.loads(str(arrays.pop("config_json"))))
    return _CACHE[name]


def state_dict(arrays, prefix: str):
    """The reference state_dict entries under `vae/` or `var/`, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


def device_flags(num_devices: int) -> str:
    """XLA_FLAGS for a subprocess with `num_devices` simulated CPU devices and this session's other flags."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}"])


def subprocess_env(**overrides) -> dict:
    """os.environ (the session's XLA flags and compilation cache) with the repo on PYTHONPATH and `overrides`."""
    env = dict(os.environ, **overrides)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 900) -> str:
    """Run python `code` in a subprocess with `num_devices` simulated CPU devices; returns stdout.

    XLA_FLAGS must be set before JAX starts, hence the subprocess."""
    env = subprocess_env(XLA_FLAGS=device_flags(num_devices))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests"), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def repo_config(spec: str):
    """configs/SPEC ('digits_var.py:depth=2') loaded the way `var-jax train --config` loads it."""
    from var_jax.cli.train import load_config
    return load_config(str(REPO_ROOT / "configs" / spec))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny random tokenizer model directory (patch_nums (1,2,3,4), 16 px images -> 4x4 latent)."""
    from flax import nnx

    from var_jax.checkpoints import save_model_dir
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE
    cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                          patch_nums=(1, 2, 3, 4))
    path = tmp_path_factory.mktemp("tok") / "model"
    save_model_dir(path, tokenizer=(cfg, VQVAE(cfg, rngs=nnx.Rngs(0))))
    return path
