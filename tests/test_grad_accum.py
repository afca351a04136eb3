"""Gradient accumulation (train/grad_accum.py): k micro-batches in one jitted step against the one-shot step (VAR
and tokenizer, fresh random data), against the mean of separately computed micro-batch gradients when class
dropout and drop path draw random numbers, on a sharded mesh, and the configuration checks."""
import json
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import repo_config, run_with_devices
from test_tokenizer_training import BATCH, IMAGE, TINY, build as build_tokenizer
from test_train_step import L, PATCH_NUMS, _random_batch, tiny_var_config
from var_jax.checkpoints import model_parts
from var_jax.sharding import make_mesh
from var_jax.train import grad_accum, optimizer
from var_jax.train.stage import ConfigError
from var_jax.train.state import abstract_train_state, init_train_state, jit_train_step
from var_jax.train.tokenizer.state import DiscriminatorConfig
from var_jax.train.tokenizer.step import TokenizerLossConfig, check_grad_accum, make_tokenizer_train_step
from var_jax.train.var import loss as var_loss
from var_jax.train.var import step as var_step
from var_jax.transformer import VAR

# Adam's first update is ~lr·sign(g) with a small eps, blind to a gradient's size; with eps = 1 it is
# ~lr·g/(|g| + 1), so the parameters show the gradient itself (lr = tblr·8/256, large enough to see).
# The tests compare two compiled programs with each other, not their speed: skip LLVM's costly optimisations
# (this halves the tokenizer step's CPU compile time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
OPTIM = dict(tblr=1.0, b1=0.9, b2=0.95, eps=1.0, warmup_steps=0, warmup_fraction=0.0, wp0=0.005, wpe=0.1,
             schedule="lin0", wd=0.05, wd_end=0.05, grad_clip=0.0)


def setup_var(var_cfg):
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model_fn = lambda rngs: VAR(var_cfg, rngs=rngs)  # noqa: E731
    parts = model_parts(model_fn)
    tx = optimizer.make_optimizer(ml_collections.ConfigDict(OPTIM), batch_size=8, total_steps=10,
                                  mask=optimizer.decay_mask(parts.param_vars))
    layout = abstract_train_state(parts, tx, mesh)
    return parts, tx, layout, mesh, init_train_state(model_fn, tx, layout, mesh, seed=random.randrange(2 ** 16))


def var_step_result(parts, tx, layout, mesh, state, batch, **step_kw):
    step_cfg = var_step.VarStepConfig(patch_nums=PATCH_NUMS, **step_kw)
    step = jit_train_step(var_step.make_var_train_step(parts, tx, step_cfg), layout, mesh, batch)
    with jax.set_mesh(mesh):
        step = step.lower(state, batch, None).compile(compiler_options=FAST_COMPILE)
        new, metrics = step(jax.tree.map(jnp.copy, state), batch, None)   # the state is donated
    return jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in metrics.items()}


def update_rel_error(params, want, start):
    """Largest L2 error of a parameter array's update (new - start) against the wanted update, relative to that
    update, or to 1e-3 of the largest one where an update is ~0 (e.g. a bias whose gradients cancel exactly, where
    only rounding noise is left)."""
    leaves = list(zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(start)))
    floor = 1e-3 * max(np.linalg.norm(b - s) for _, b, s in leaves)
    return max(np.linalg.norm(a - b) / max(np.linalg.norm(b - s), floor) for a, b, s in leaves)


def test_var_accumulated_step_equals_one_shot():
    """No randomness in the model: 4 micro-batches of 2 give the loss, metrics and update of one batch of 8."""
    rng = np.random.default_rng()
    parts, tx, layout, mesh, state = setup_var(tiny_var_config())
    batch = _random_batch(rng, batch=8)
    start = jax.tree.map(np.asarray, state.params)
    one_params, one = var_step_result(parts, tx, layout, mesh, state, batch)
    acc_params, acc = var_step_result(parts, tx, layout, mesh, state, batch, grad_accum_steps=4)
    for name in ("loss", "Lm", "Lt", "Accm", "Acct", "grad_norm", "lr"):
        assert acc[name] == pytest.approx(one[name], rel=2e-6, abs=1e-6), name
    assert update_rel_error(acc_params, one_params, start) < 1e-4
    assert max(np.max(np.abs(a - s)) for a, s in zip(jax.tree.leaves(one_params), jax.tree.leaves(start))) > 1e-4


def test_var_accumulation_with_dropout_is_the_mean_of_micro_batch_gradients():
    """Class dropout and drop path on, progressive stage prog_si=1 with a ramp: the accumulated update equals one
    optimizer update with the mean of the gradients of micro-batches j (examples j, j+k, ...), each computed
    directly with the key fold_in(fold_in(rng, step), j)."""
    rng = np.random.default_rng()
    k, prog_si, ramp = 2, 1, 0.3
    parts, tx, layout, mesh, state = setup_var(tiny_var_config(cond_drop_rate=0.5, drop_path_rate=0.3))
    batch = _random_batch(rng, batch=8, ramp=ramp)
    start = jax.tree.map(np.asarray, state.params)
    got_params, got = var_step_result(parts, tx, layout, mesh, state, batch, grad_accum_steps=k, prog_si=prog_si)

    seq = 5                                   # scales 1 and 2: 1 + 4 tokens
    weights = np.full(seq, 1.0 / L, np.float32)
    weights[1:] *= ramp

    @jax.jit
    def micro_loss_and_grads(params, labels, teacher, tokens, key):
        cond_key, dropout_key = jax.random.split(key)

        def loss(p):
            logits = parts.merge(p)(labels, teacher[:, :seq - 1], cond_drop_key=cond_key, deterministic=False,
                                    dropout_key=dropout_key, num_scales=prog_si + 1)
            ce = var_loss.token_cross_entropy(logits, tokens[:, :seq])
            return jnp.mean(jnp.sum(ce * weights, axis=-1))
        return jax.value_and_grad(loss)(params)

    step_key = jax.random.fold_in(state.rng, state.step)

    def reference(keys):
        outs = [micro_loss_and_grads(state.params, batch["label"][j::k], batch["teacher_input"][j::k],
                                     batch["tokens"][j::k], key) for j, key in enumerate(keys)]
        return np.mean([float(o[0]) for o in outs]), jax.tree.map(lambda *g: sum(g) / k, *[o[1] for o in outs])

    keys = [jax.random.fold_in(step_key, j) for j in range(k)]
    want_loss, want_grads = reference(keys)
    updates, _ = tx.update(want_grads, state.opt_state, state.params)
    want_params = jax.tree.map(np.asarray, optax.apply_updates(state.params, updates))
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["grad_norm"] == pytest.approx(float(optax.tree.norm(want_grads)), rel=1e-5)
    assert update_rel_error(got_params, want_params, start) < 1e-4
    # the keys matter: the same micro-batches with their keys swapped give another loss
    assert abs(reference(keys[::-1])[0] - want_loss) > 1e-4


def test_tokenizer_accumulated_step_equals_one_shot():
    """GAN (fixed weight) and dead-code restart on: 2 micro-batches give the losses, usage EMA, restarted codes
    (drawn from the encoder features of the whole batch) and parameters of the one-shot step."""
    rng = np.random.default_rng()
    loss_cfg = TokenizerLossConfig(disc_weight=0.5, adaptive_disc_weight=False, restart_every=1,
                                   restart_threshold=2.0)
    images = jnp.asarray(np.tanh(rng.normal(size=(BATCH, IMAGE, IMAGE, 3))), jnp.float32)
    parts, tx, _, state = build_tokenizer(DiscriminatorConfig(base_channels=8, num_layers=1), eps=1.0,
                                          seed=random.randrange(2 ** 16))
    start = jax.tree.map(np.asarray, state.params)
    results = []
    for k in (1, 2):
        step = jax.jit(make_tokenizer_train_step(parts.merge, tx, TINY, loss_cfg, grad_accum_steps=k))
        new, metrics = step.lower(state, {"image": images}, None).compile(compiler_options=FAST_COMPILE)(
            state, {"image": images}, None)
        results.append((jax.tree.map(np.asarray, new.params), jax.device_get(metrics), np.asarray(new.usage_ema)))
    (one_params, one, one_ema), (acc_params, acc, acc_ema) = results
    assert one["codes_restarted"] == acc["codes_restarted"] > 0
    for name in ("loss", "recon", "vq", "psnr", "g_loss", "d_loss", "logits_real", "logits_fake", "grad_norm",
                 "d_grad_norm", "code_usage"):
        assert acc[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
    np.testing.assert_array_equal(acc_ema, one_ema)   # hit counts: integers, summed exactly
    codebook = lambda p: p["generator"]["codebook"]  # noqa: E731
    np.testing.assert_allclose(codebook(acc_params), codebook(one_params), rtol=1e-5, atol=1e-6)
    assert update_rel_error(acc_params, one_params, start) < 1e-4


def test_adaptive_gan_weight_refuses_accumulation():
    adaptive = TokenizerLossConfig(disc_weight=0.5)
    with pytest.raises(ValueError, match=r"grad_accum_steps: 2 micro-batches cannot reproduce the adaptive GAN"):
        make_tokenizer_train_step(None, None, TINY, adaptive, grad_accum_steps=2)   # refused before any use
    check_grad_accum(adaptive, 1)
    check_grad_accum(TokenizerLossConfig(disc_weight=0.5, adaptive_disc_weight=False), 2)
    check_grad_accum(TokenizerLossConfig(), 4)


def test_grad_accum_config_checks():
    mesh = jax.sharding.AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))
    config = ml_collections.ConfigDict(dict(batch_size=24, grad_accum_steps=3))
    assert grad_accum.grad_accum_steps(config, mesh) == 3
    assert grad_accum.grad_accum_steps(ml_collections.ConfigDict(dict(batch_size=4)), mesh) == 1   # absent: 1
    config.grad_accum_steps = 4
    with pytest.raises(ConfigError, match=r"grad_accum_steps: batch_size 24 does not split into 4 micro-batches "
                                          r"over the 4 data-parallel devices \(.*4 × 4 = 16\)"):
        grad_accum.grad_accum_steps(config, mesh)
    config.grad_accum_steps = 0
    with pytest.raises(ConfigError, match="grad_accum_steps: must be a positive integer"):
        grad_accum.grad_accum_steps(config, mesh)


def test_stages_name_the_field(tokenizer_dir):
    from var_jax.train.tokenizer.stage import build_tokenizer_stage
    from var_jax.train.var.stage import build_var_stage
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    config = repo_config("digits_var.py:depth=2,width=64,batch=8,steps=2,image_size=16")
    config.tokenizer_checkpoint, config.patch_nums, config.grad_accum_steps = str(tokenizer_dir), (1, 2, 3, 4), 3
    with pytest.raises(ConfigError, match=r"grad_accum_steps: batch_size 8 does not split into 3"):
        build_var_stage(config, mesh, 10)
    config = repo_config("digits_tokenizer.py:batch=8,steps=2")
    config.grad_accum_steps, config.loss.disc_weight = 2, 0.5
    with pytest.raises(ConfigError, match=r"grad_accum_steps: 2 micro-batches cannot reproduce the adaptive"):
        build_tokenizer_stage(config, mesh, 10)


SHARDED = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np, ml_collections
from flax import nnx
import var_jax
from var_jax.checkpoints import model_parts
from var_jax.data.pipeline import global_batch_from_host
from var_jax.sharding import make_mesh, state_shardings
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.train import optimizer
from var_jax.train.state import abstract_train_state, init_train_state, jit_train_step
from var_jax.train.var.step import VarStepConfig, make_tokenizer_fn, make_var_train_step
from var_jax.transformer import VAR, VARConfig

tok_cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                          patch_nums=(1, 2, 3, 4))
tok_graphdef, tok_vars = nnx.split(VQVAE(tok_cfg, rngs=nnx.Rngs(1)))
var_cfg = VARConfig(depth=2, width=64, heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4),
                    drop_path_rate=0.0, cond_drop_rate=0.0, init_head=1.0)
model_fn = lambda rngs: VAR(var_cfg, rngs=rngs)
parts = model_parts(model_fn)
tx = optimizer.make_optimizer(ml_collections.ConfigDict(OPTIM), batch_size=16, total_steps=5,
                              mask=optimizer.decay_mask(parts.param_vars))
rng = np.random.default_rng(SEED)
batch = {"image": rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8),
         "label": rng.integers(0, 10, size=(16,)).astype(np.int32)}
mesh = make_mesh((2, 2, 1))
layout = abstract_train_state(parts, tx, mesh)
tok_sh = nnx.to_pure_dict(state_shardings(tok_vars, mesh))
frozen = jax.device_put(nnx.to_pure_dict(tok_vars), tok_sh)
start = init_train_state(model_fn, tx, layout, mesh, seed=0)
out = {"start": [np.asarray(x).tolist() for x in jax.tree.leaves(start.params)[:4]]}
for k in (1, 2):
    step_fn = make_var_train_step(parts, tx, VarStepConfig(patch_nums=(1, 2, 3, 4), grad_accum_steps=k),
                                  make_tokenizer_fn(tok_graphdef, tok_cfg))
    step = jit_train_step(step_fn, layout, mesh, batch, tok_sh)
    with jax.set_mesh(mesh):
        device_batch = global_batch_from_host(batch, mesh)
        compiled = step.lower(start, device_batch, frozen).compile(compiler_options=FAST_COMPILE)
        hlo = compiled.as_text()
        state, m = compiled(jax.tree.map(jnp.copy, start), device_batch, frozen)
    out[k] = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "Accm": float(m["Accm"]),
              "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)[:4]],
              "all_to_all": hlo.count("all-to-all"),
              # the most uint8 images in one array of a device's program (its own shard: 16 / 4 devices)
              "u8_images": max(int(np.prod(dims[:-3])) for dims in
                               ([int(d) for d in m.split(",")] for m in re.findall(r"u8\[([0-9,]+)\]", hlo))
                               if dims[-3:] == [16, 16, 3])}
print("RESULT" + json.dumps(out))
"""


def test_sharded_accumulation_keeps_examples_on_their_devices():
    """4 simulated devices (data 2 × fsdp 2), tokenising in the step, 16 images in 2 micro-batches: the one-shot
    step's loss and update; splitting into micro-batches moves no image between devices (no uint8 array beyond a
    device's own 4 images, no all-to-all beyond the model's own)."""
    seed = random.randrange(2 ** 31)
    code = SHARDED.replace("SEED", str(seed)).replace("OPTIM", repr(OPTIM)).replace("FAST_COMPILE", repr(FAST_COMPILE))
    out = json.loads(run_with_devices(code, 4)
                     .split("RESULT", 1)[1])
    one, acc = out["1"], out["2"]
    for name in ("loss", "grad_norm", "Accm"):
        assert acc[name] == pytest.approx(one[name], rel=2e-6, abs=1e-6), (name, seed)
    start = [np.array(x) for x in out["start"]]
    for a, b, s in zip(acc["params"], one["params"], start):
        a, b = np.array(a), np.array(b)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b - s) + 1e-9, seed
    assert acc["u8_images"] == one["u8_images"] == 4, (acc["u8_images"], one["u8_images"])
    assert acc["all_to_all"] == one["all_to_all"], (acc["all_to_all"], one["all_to_all"])
