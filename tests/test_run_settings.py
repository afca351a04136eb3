"""Run settings (compute dtype, remat, attention implementation) are not part of a model: a model directory
saved with one compute dtype samples with another, old directories that stored them still load, and a training
run resumed with a different remat / attention_impl continues with the same losses."""
import json
import shutil

import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT
from var_jax.checkpoints import CONFIG_FILE, load_model_dir, save_model_dir
from var_jax.sample.sampler import SampleOptions, make_sample_fn
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.transformer import VAR, RunSettings, VARConfig

TOKENIZER = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                            patch_nums=(1, 2, 3, 4))


def save_tiny(path, compute_dtype):
    cfg = VARConfig(depth=2, width=64, heads=2, num_classes=4, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4),
                    compute_dtype=compute_dtype)
    save_model_dir(path, tokenizer=(TOKENIZER, VQVAE(TOKENIZER, rngs=nnx.Rngs(0))), var=(cfg, VAR(cfg, rngs=nnx.Rngs(1))))
    return path


def greedy_logits(bundle):
    var_graphdef, var_state = nnx.split(bundle.var)
    tok_graphdef, tok_state = nnx.split(bundle.tokenizer)
    fn = make_sample_fn(var_graphdef, tok_graphdef, SampleOptions(cfg=1.5, top_k=1, top_p=0.0), decode=False,
                        with_logits=True)
    out = fn(var_state, tok_state, np.arange(2, dtype=np.int32), np.arange(2, dtype=np.int32), 0)
    return np.asarray(out["logits"][0])     # scale 0: the same input whatever was drawn before


@pytest.mark.parametrize("saved,run", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_a_model_samples_with_another_compute_dtype(tmp_path, saved, run):
    path = save_tiny(tmp_path / "model", saved)
    stored = json.loads((path / CONFIG_FILE).read_text())["var"]
    assert not {"compute_dtype", "remat", "attention_impl"} & set(stored)     # identity only
    bundle = load_model_dir(path, run_settings=RunSettings(compute_dtype=run))
    assert bundle.var_config.compute_dtype == run
    assert bundle.var.init_cache(1)["k"].dtype == np.dtype(run)
    logits = greedy_logits(bundle)
    reference = greedy_logits(load_model_dir(path, run_settings=RunSettings(compute_dtype="float32")))
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits, reference, atol=0.05 if run == "bfloat16" else 0)


def test_old_model_directories_with_run_settings_still_load(tmp_path):
    path = save_tiny(tmp_path / "model", "float32")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["var"].update(compute_dtype="bfloat16", remat="block", attention_impl="xla")   # as written before
    (path / CONFIG_FILE).write_text(json.dumps(config))
    bundle = load_model_dir(path)
    assert bundle.var_config.run_settings == RunSettings().resolved()


def train(workdir, tokenizer, steps, *extra):
    from var_jax.cli import main
    assert main(["train", "--config", str(REPO_ROOT / "configs/digits_var.py") + ":depth=2,width=64,batch=8,image_size=16",
                 "--workdir", str(workdir), f"--config.tokenizer_checkpoint={tokenizer}", "--config.patch_nums=(1,2,3,4)",
                 f"--config.total_steps={steps}", "--config.log_every=1", "--config.checkpoint_every=2",
                 "--config.sample_every=0", *extra]) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_run_resumes_with_another_remat_and_attention_impl(tmp_path):
    tokenizer = tmp_path / "tokenizer"
    save_model_dir(tokenizer, tokenizer=(TOKENIZER, VQVAE(TOKENIZER, rngs=nnx.Rngs(0))))
    straight = train(tmp_path / "straight", tokenizer, 4)
    # the same run stopped after its step-2 checkpoint, resumed with other run settings
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    later = [d for d in (tmp_path / "resumed" / "checkpoints").iterdir() if d.name.isdigit() and int(d.name) > 2]
    assert later
    for d in later:
        shutil.rmtree(d)
    resumed = train(tmp_path / "resumed", tokenizer, 4, "--config.model.remat=block", "--config.model.attention_impl=xla")
    assert sorted(straight) == [1, 2, 3, 4] and {3, 4} <= set(resumed)
    np.testing.assert_allclose([resumed[s] for s in (3, 4)], [straight[s] for s in (3, 4)], rtol=1e-5, atol=1e-6)


def test_a_run_recorded_before_the_derived_schedule_defaults_still_resumes(tmp_path):
    """Workdirs recorded with optim.schedule 'lin0' and progressive.ramp_steps 1 (the defaults before the
    reference's progressive schedule) resume under today's 'auto' / -1 defaults when progressive training is off;
    a schedule that computes something else is still refused, naming the field."""
    from configs.digits_var import get_config
    from resume_guard import check_resumes, record_run
    from var_jax.train.checkpointing import CheckpointMismatch, run_identity
    config = get_config()
    old = run_identity(config)
    old["optim"]["schedule"], old["progressive"]["ramp_steps"] = "lin0", 1
    record_run(tmp_path, old)
    check_resumes(tmp_path, config)
    other = get_config()
    other.optim.schedule = "constant"
    with pytest.raises(CheckpointMismatch, match="optim.schedule"):
        check_resumes(tmp_path, other)
    progressive = get_config()
    progressive.progressive.fraction = 0.5
    with pytest.raises(CheckpointMismatch, match="progressive"):
        check_resumes(tmp_path, progressive)
