"""The ablations of issue 11 on the model's own code path: adaln=False (class only in the start token, plain
LayerNorm) and order='raster' (the next-token AR baseline over a single-scale tokenizer)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import repo_config
from var_jax.checkpoints import ModelBundle, model_parts
from var_jax.sample.filtering import guidance_strength, mix_guidance
from var_jax.sample.runner import Sampler
from var_jax.sample.sampler import SampleOptions, make_sample_fn
from var_jax.sharding import make_mesh
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.train import optimizer
from var_jax.train.state import abstract_train_state, init_train_state, jit_train_step
from var_jax.train.var import step as var_step
from var_jax.transformer import VAR, VARConfig
from var_jax.transformer.convert import var_from_state_dict, var_to_state_dict

V, CVAE, CLASSES = 32, 8, 4


def tiny_var(**kw):
    base = dict(depth=2, width=32, heads=2, num_classes=CLASSES, vocab_size=V, z_channels=CVAE,
                patch_nums=(1, 2, 3, 4), cond_drop_rate=0.0, drop_path_rate=0.0, init_head=1.0)
    base.update(kw)
    return VARConfig(**base)


def tiny_raster(**kw):
    return tiny_var(order="raster", patch_nums=(4,), **kw)


def tiny_tokenizer(patch_nums):
    cfg = TokenizerConfig(vocab_size=V, z_channels=CVAE, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                          patch_nums=patch_nums, share_quant_resi=min(4, len(patch_nums)))
    return cfg, VQVAE(cfg, rngs=nnx.Rngs(1))


def bundle(var_cfg, seed=0):
    tok_cfg, tokenizer = tiny_tokenizer(var_cfg.patch_nums)
    return ModelBundle(tok_cfg, tokenizer, var_cfg, VAR(var_cfg, rngs=nnx.Rngs(seed)))


def param_paths(model):
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---- adaln=False -----------------------------------------------------------------------------------------------

def test_no_adaln_parameter_count():
    with_ada, without = VAR(tiny_var(), rngs=nnx.Rngs(0)), VAR(tiny_var(adaln=False), rngs=nnx.Rngs(0))
    C, depth = 32, 2
    # each block's ada_lin (C -> 6C) becomes two affine LayerNorms; the head's ada_lin (C -> 2C) one
    removed = depth * (C * 6 * C + 6 * C) + (C * 2 * C + 2 * C)
    added = depth * 4 * C + 2 * C
    assert without.num_params() == with_ada.num_params() - removed + added
    paths = param_paths(without)
    assert not any("ada" in p for p in paths)
    assert {"blocks.norm1.scale", "blocks.norm2.bias", "head_nm.scale", "head_nm.bias"} <= paths


def test_no_adaln_forward_backward_and_class_conditioning():
    model = VAR(tiny_var(adaln=False), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    teacher = jax.random.normal(jax.random.key(1), (3, 29, CVAE))
    tokens = jax.random.randint(jax.random.key(2), (3, 30), 0, V)

    def loss(params, labels):
        logits = nnx.merge(graphdef, params, rest)(labels, teacher)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean(), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params, jnp.array([0, 1, 2]))
    assert logits.shape == (3, 30, V) and np.isfinite(float(value))
    flat = {".".join(map(str, p)): np.asarray(g) for p, g in nnx.to_flat_state(grads)}
    for name in ("class_emb.embedding", "blocks.norm1.scale", "blocks.norm2.bias", "head_nm.scale"):
        assert np.abs(flat[name]).max() > 0, name
    # the class still conditions every position, through the start token only
    other = loss(params, jnp.array([3, 3, 3]))[1]
    assert np.all(np.abs(np.asarray(other - logits)).max(-1) > 0)


def test_no_adaln_samples_with_guidance():
    b = bundle(tiny_var(adaln=False))
    out = Sampler(b, SampleOptions(cfg=2.0, top_k=8, top_p=0.9))(np.array([0, 1, 2, CLASSES]), seed=3)
    assert out["images"].shape == (4, 16, 16, 3) and out["images"].dtype == np.uint8
    assert [t.shape for t in out["tokens"]] == [(4, pn * pn) for pn in (1, 2, 3, 4)]
    assert all(t.min() >= 0 and t.max() < V for t in out["tokens"])


def test_converter_refuses_ablations():
    with pytest.raises(ValueError, match="adaln=False"):
        var_from_state_dict({}, adaln=False)
    with pytest.raises(ValueError, match="raster"):
        var_from_state_dict({}, order="raster")
    with pytest.raises(ValueError, match="adaln=False"):
        var_to_state_dict(VAR(tiny_var(adaln=False), rngs=nnx.Rngs(0)))


def test_ablation_config_checks():
    with pytest.raises(ValueError, match="shared_aln"):
        tiny_var(adaln=False, shared_aln=True)
    with pytest.raises(ValueError, match="single-scale"):
        tiny_var(order="raster")
    with pytest.raises(ValueError, match="order"):
        tiny_var(order="diagonal")
    cfg = tiny_raster(adaln=False)
    assert VARConfig.from_dict(cfg.to_dict()) == cfg
    # model directories written before the switches existed load as the defaults
    old = {k: v for k, v in tiny_var().to_dict().items() if k not in ("adaln", "order")}
    assert VARConfig.from_dict(old) == tiny_var()


# ---- order='raster' --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adaln", [True, False])
def test_raster_mask_is_causal(adaln):
    model = VAR(tiny_raster(adaln=adaln), rngs=nnx.Rngs(0))
    labels = jnp.array([1, 2])
    teacher = jax.random.normal(jax.random.key(0), (2, 15, CVAE))
    base = np.asarray(model(labels, teacher))
    assert base.shape == (2, 16, V)
    for t in (0, 6, 14):   # teacher row t is token t's code, read at position t+1
        changed = np.asarray(model(labels, teacher.at[:, t].add(1.0)))
        np.testing.assert_array_equal(changed[:, :t + 1], base[:, :t + 1])
        assert np.abs(changed[:, t + 1] - base[:, t + 1]).max() > 1e-4


@pytest.mark.parametrize("cfg_scale,schedule", [(0.0, "linear"), (1.5, "linear"), (2.0, "constant")])
def test_raster_cached_sampling_equals_teacher_forcing(cfg_scale, schedule):
    b = bundle(tiny_raster())
    options = SampleOptions(cfg=cfg_scale, cfg_schedule=schedule, top_k=0, top_p=0.0)
    labels = np.array([0, 1, 3])
    out = Sampler(b, options, with_logits=True)(labels, seed=5)
    tokens, cached = out["tokens"][0], out["logits"][0]
    assert tokens.shape == (3, 16) and cached.shape == (3, 16, V)
    teacher = var_step.raster_teacher_input(b.tokenizer.quantizer_params()["codebook"], jnp.asarray(tokens))
    forced = np.asarray(b.var(jnp.asarray(labels), teacher))
    if cfg_scale:
        uncond = np.asarray(b.var(jnp.full_like(jnp.asarray(labels), CLASSES), teacher))
        t = np.float32([guidance_strength(cfg_scale, i, 16, schedule) for i in range(16)])[None, :, None]
        forced = np.asarray(mix_guidance(forced, uncond, t))
    np.testing.assert_allclose(cached, forced, rtol=1e-5, atol=1e-5)


def test_raster_samples_shape_range_and_determinism():
    b = bundle(tiny_raster(adaln=False))
    sampler = Sampler(b, SampleOptions(cfg=1.5, top_k=10, top_p=0.95))
    out = sampler(np.array([0, 1, 2, 3, CLASSES]), seed=7)
    assert out["images"].shape == (5, 16, 16, 3) and out["images"].dtype == np.uint8
    (tokens,) = out["tokens"]
    assert tokens.shape == (5, 16) and tokens.min() >= 0 and tokens.max() < V
    # image i's stream depends on its id only: a sub-batch draws the same tokens
    again = sampler(np.array([2, 3]), image_ids=np.array([2, 3]), seed=7)
    np.testing.assert_array_equal(again["tokens"][0], tokens[2:4])
    with pytest.raises(ValueError, match="more_smooth"):
        graphdef, state = nnx.split(b.var)
        tg, ts = nnx.split(b.tokenizer)
        make_sample_fn(graphdef, tg, SampleOptions(more_smooth=True))(state, ts, np.array([0]), np.array([0]), 0)


def test_raster_trains_on_a_fixed_batch():
    var_cfg = tiny_raster()
    tok_cfg, tokenizer = tiny_tokenizer(var_cfg.patch_nums)
    tok_graphdef, tok_state = nnx.split(tokenizer)
    tokenize = var_step.make_tokenizer_fn(tok_graphdef, tok_cfg, order="raster")
    images = jnp.tanh(jax.random.normal(jax.random.key(0), (8, 16, 16, 3)))
    tokens, teacher = tokenize(nnx.to_pure_dict(tok_state), images)
    assert tokens.shape == (8, 16) and teacher.shape == (8, 15, CVAE)
    codebook = tokenizer.quantizer_params()["codebook"]
    np.testing.assert_array_equal(np.asarray(teacher), np.asarray(codebook)[np.asarray(tokens)[:, :-1]])

    model_fn = lambda rngs: VAR(var_cfg, rngs=rngs)
    parts = model_parts(model_fn)
    optim = ml_collections.ConfigDict(dict(tblr=0.1, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=0, warmup_fraction=0.0,
                                           wp0=0.005, wpe=1.0, schedule="constant", wd=0.0, wd_end=0.0,
                                           grad_clip=2.0))
    tx = optimizer.make_optimizer(optim, batch_size=8, total_steps=10, mask=optimizer.decay_mask(parts.param_vars))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    layout = abstract_train_state(parts, tx, mesh)
    state = init_train_state(model_fn, tx, layout, mesh, 0)
    batch = {"image": np.asarray(images, np.float32), "label": np.arange(8, dtype=np.int32) % CLASSES}
    step = jit_train_step(var_step.make_var_train_step(parts, tx, var_step.VarStepConfig(patch_nums=(4,)), tokenize),
                          layout, mesh, batch, None)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(8):
            state, metrics = step(state, batch, nnx.to_pure_dict(tok_state))
            losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_shapes_raster_config():
    tok = repo_config("shapes_raster.py:stage=tokenizer")
    var = repo_config("shapes_raster.py")
    assert tok.stage == "tokenizer" and tuple(tok.patch_nums) == (8,) and tok.total_steps == 6000
    assert var.stage == "var" and tuple(var.patch_nums) == (8,) and var.total_steps == 1000
    multi = repo_config("shapes_tokenizer.py")   # both rows of Table 3 start from the same recipe
    assert (tok.tokenizer.vocab_size, tok.tokenizer.z_channels) == (multi.tokenizer.vocab_size,
                                                                     multi.tokenizer.z_channels) == (4096, 32)
    assert var.model.order == "raster" and var.model.adaln


def test_raster_train_and_sample_commands(tmp_path):
    """configs/shapes_raster.py through `train` (a few steps on a tiny single-scale tokenizer, with the stage's PNG
    samples and the held-out evaluation) and `sample` on the exported model, on one device and on a 2-device mesh:
    the commands are unchanged, the sampler dispatches on the order."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from var_jax.checkpoints import load_model_dir, save_model_dir
    tok_cfg, tokenizer = tiny_tokenizer((4,))
    save_model_dir(tmp_path / "tok", tokenizer=(tok_cfg, tokenizer))

    def run(*argv, devices=1):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        proc = subprocess.run([sys.executable, "-m", "var_jax", *argv], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    work = tmp_path / "raster"
    run("train", "--config", "configs/shapes_raster.py:depth=1,batch=8,steps=3,image_size=16,latent=4,adaln=false",
        "--workdir", str(work), f"--config.tokenizer_checkpoint={tmp_path / 'tok'}", "--config.log_every=1",
        "--config.sample_every=3", "--config.num_sample_images=4", "--config.eval_every=3",
        "--config.eval_batch_size=1000")
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(records[-1]["val/loss"]) and records[-1]["val/images"] == 10_000
    loaded = load_model_dir(work / "model")
    assert loaded.var_config.order == "raster" and not loaded.var_config.adaln
    samples = []
    for devices, extra in ((1, []), (2, ["--mesh", "2,1,1"])):
        out = tmp_path / f"samples{devices}"
        run("sample", "--checkpoint", str(work / "model"), "--classes", "0,1,2", "--num-per-class", "2",
            "--batch-size", "4", "--out", str(out), *extra, devices=devices)
        with np.load(out / "samples.npz") as data:
            samples.append({k: data[k] for k in data.files})
    images = [v for v in samples[0].values() if v.ndim == 4]
    assert len(images) == 1 and images[0].shape == (6, 16, 16, 3), {k: v.shape for k, v in samples[0].items()}
    for key, value in samples[0].items():
        np.testing.assert_array_equal(samples[1][key], value, err_msg=key)
