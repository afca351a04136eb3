"""Shared test helpers: the reference fixtures recorded from the original PyTorch VAR.

The fixtures live in ../shared/fixtures from the repo root (override with VAR_JAX_FIXTURES). Where they are
absent the tests that need them skip with the reason, except under CI=true, where absence is a failure.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import var_jax  # noqa: F401  (sets its CPU XLA flags before any test starts JAX's backend)

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


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 900) -> str:
    """Run python `code` in a subprocess with `num_devices` simulated CPU devices; returns stdout.

    XLA_FLAGS must be set before JAX starts, hence the subprocess."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")])
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
