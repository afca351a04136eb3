"""Bad configuration values fail before anything is compiled, with a message naming the field."""
import subprocess
import sys

import jax
import pytest

from conftest import REPO_ROOT, repo_config
from var_jax.train import trainer
from var_jax.train.stage import ConfigError, check_batch_divides


@pytest.fixture
def config(tokenizer_dir):  # noqa: F811
    cfg = repo_config("digits_var.py:depth=2,width=64,batch=8,steps=2,image_size=16")
    cfg.tokenizer_checkpoint = str(tokenizer_dir)
    cfg.patch_nums = (1, 2, 3, 4)
    cfg.sample_every = 0
    return cfg


@pytest.fixture(autouse=True)
def no_compile(monkeypatch):
    """Every case must fail before the first compilation: make compiling itself an error."""
    # Import every stage module first: one imported while the patch is active would keep `refuse` for good.
    import var_jax.train.tokenizer.stage as tokenizer_stage
    import var_jax.train.tokenizer.state as tokenizer_state
    import var_jax.train.var.stage as var_stage
    from var_jax.train import state

    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the configuration was checked")
    for module in (state, var_stage, tokenizer_stage, tokenizer_state):
        for name in ("init_train_state", "jit_train_step"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("field,value,message", [
    ("patch_nums", (1, 2, 3, 5), r"patch_nums: .*must end at the latent size"),
    ("model.heads", 3, r"model\.width: must be divisible by heads=3"),
    ("model.num_classes", 5, r"model\.num_classes: 5 is smaller than the dataset's 10 classes"),
    ("tokenizer_checkpoint", "/nonexistent/tok", r"tokenizer_checkpoint: /nonexistent/tok is neither"),
    ("tokenizer_checkpoint", "", r"tokenizer_checkpoint: required"),
    ("mesh", (3, 1, 1), r"mesh: .*needs 3 devices"),
    ("total_steps", 0, r"total_steps: must be a positive integer"),
    ("stage", "vae", r"stage: must be one of"),
    ("loss.scale_weights", (1.0, 2.0), r"loss\.scale_weights: needs one weight per scale"),
    ("optim.schedule", "cosine-ish", r"optim\.schedule"),
    ("progressive.fraction", 1.5, r"progressive\.fraction"),
])
def test_bad_value_is_named(config, tmp_path, field, value, message):
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        trainer.train(config, tmp_path / "run")


def test_missing_dataset_is_named(config, tmp_path):
    config.data.name = "folder"
    config.data.path = str(tmp_path / "no_such_dir")
    with pytest.raises(ConfigError, match=r"data: .*'path'"):
        trainer.train(config, tmp_path / "run")


def test_batch_not_divisible_by_data_axes():
    mesh = jax.sharding.AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
    with pytest.raises(ConfigError, match=r"batch_size: 12 is not divisible by the 8 data-parallel devices"):
        check_batch_divides(12, mesh)
    check_batch_divides(16, mesh)


def test_cli_rejects_unknown_and_mistyped_overrides(tmp_path):
    base = [sys.executable, "-m", "var_jax", "train", "--config", "configs/digits_var.py", "--workdir", str(tmp_path)]
    for extra, message in ((["--config.totl_steps=4"], "--config.totl_steps: no such config field"),
                           (["--config.total_steps=four"], "--config.total_steps=four"),
                           (["--config.optim.tblr", "abc"], "--config.optim.tblr=abc")):
        proc = subprocess.run(base + extra, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]


def test_cli_overrides_apply_with_types(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "var_jax", "train", "--config", "configs/digits_var.py:depth=2",
                           "--workdir", str(tmp_path), "--config.total_steps=4", "--config.mesh=(2,2,2)",
                           "--config.optim.tblr", "3e-4", "--print_config"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "total_steps: 4" in proc.stdout and "tblr: 0.0003" in proc.stdout
    assert "- 2\n- 2\n- 2" in proc.stdout.replace("  ", "") or "mesh: !!python/tuple" in proc.stdout


def test_tokenizer_checkpoint_accepts_a_training_workdir(tokenizer_dir, tmp_path):
    """A tokenizer training workdir holds the run's train_config.json (config.json in older workdirs, the name a
    model directory gives its own config) *and* the exported model in model/."""
    import json
    import shutil
    import ml_collections

    from var_jax.checkpoints import resolve_model_dir
    from var_jax.train.stage import load_tokenizer_for
    workdir = tmp_path / "tokenizer_run"
    shutil.copytree(tokenizer_dir, workdir / "model")
    for name in ("train_config.json", "config.json"):
        (workdir / name).write_text(json.dumps({"stage": "tokenizer"}))
        assert str(resolve_model_dir(str(workdir))) == str(workdir / "model")
    assert str(resolve_model_dir(str(workdir / "model"))) == str(workdir / "model")
    with pytest.raises(ConfigError, match="tokenizer_checkpoint"):
        load_tokenizer_for(ml_collections.ConfigDict({"tokenizer_checkpoint": str(tmp_path / "missing")}))


def test_cli_config_loads_from_another_directory_and_takes_one_mesh_syntax(tmp_path):
    """Config files import only the package (no sys.path edits): they load by path from any directory; the
    mesh is written as `--mesh` is on every other command, with or without parentheses."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    for mesh in ("2,2,1", "(2,2,1)"):
        proc = subprocess.run([sys.executable, "-m", "var_jax", "train", "--config",
                               str(REPO_ROOT / "configs" / "shapes_var.py:depth=3"), "--workdir", str(tmp_path),
                               f"--config.mesh={mesh}", "--print_config"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "mesh: !!python/tuple\n- 2\n- 2\n- 1\n" in proc.stdout and "depth: 3" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "var_jax", "train", "--config", "configs/digits_var.py",
                           "--workdir", str(tmp_path), "--bogus", "1"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "unrecognized argument --bogus" in proc.stderr, proc.stderr[-2000:]


def test_one_mesh_parser():
    from var_jax.cli.common import CommandError, parse_mesh
    assert parse_mesh("2,2,2") == parse_mesh("(2,2,2)") == parse_mesh("[2, 2, 2]") == (2, 2, 2)
    assert parse_mesh("-1,1,1") == (-1, 1, 1)
    with pytest.raises(CommandError, match="--mesh must be comma-separated integers"):
        parse_mesh("2x2")
