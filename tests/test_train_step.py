"""The VAR train step: the loss against the recorded reference loss, on-the-fly tokenisation against the recorded
tokens / teacher input, one full step against an independent computation, progressive truncation, and the
progressive schedule against the reference's formula."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import load_fixture, state_dict
from var_jax.train import optimizer
from var_jax.train.var import loss as var_loss
from var_jax.train.var import progressive
from var_jax.train.var import step as var_step
from var_jax.checkpoints import model_parts
from var_jax.train.state import abstract_train_state, init_train_state, jit_train_step
from var_jax.sharding import make_mesh
from var_jax.transformer import VAR, VARConfig

PATCH_NUMS = (1, 2, 3, 4)
L = sum(p * p for p in PATCH_NUMS)


def tiny_var_config(**kw):
    base = dict(depth=2, width=64, heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=PATCH_NUMS,
                cond_drop_rate=0.0, drop_path_rate=0.0, init_head=1.0)   # larger head init: non-trivial logits
    base.update(kw)
    return VARConfig(**base)


def optim_cfg():
    return ml_collections.ConfigDict(dict(tblr=3e-2, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=0, warmup_fraction=0.0,
                                          wp0=0.005, wpe=0.1, schedule="lin0", wd=0.05, wd_end=0.05, grad_clip=2.0))


def test_loss_matches_reference_fixture():
    arrays, _ = load_fixture("tiny")
    logits, targets = jnp.asarray(arrays["var_logits_BLV"]), jnp.asarray(arrays["var_gt_BL"])
    weights = jnp.asarray(var_loss.token_weights(PATCH_NUMS))
    loss = var_loss.weighted_loss(var_loss.token_cross_entropy(logits, targets), weights)
    np.testing.assert_allclose(float(loss), float(arrays["var_loss"]), rtol=1e-6)
    # Lm is the same quantity with uniform weights
    np.testing.assert_allclose(float(var_loss.var_metrics(logits, targets, 16)["Lm"]), float(arrays["var_loss"]),
                               rtol=1e-6)


def test_label_smoothing_and_metrics_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    logits = rng.normal(size=(3, L, 64)).astype(np.float32) * 3
    targets = rng.integers(0, 64, size=(3, L))
    ce = var_loss.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), 0.1)
    want = torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")(
        torch.tensor(logits).reshape(-1, 64), torch.tensor(targets).reshape(-1)).reshape(3, L).numpy()
    np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-5, atol=1e-6)
    m = var_loss.var_metrics(jnp.asarray(logits), jnp.asarray(targets), 16)
    pred = logits.argmax(-1)
    assert float(m["Acct"]) == pytest.approx(100 * np.mean(pred[:, -16:] == targets[:, -16:]), rel=1e-6)
    assert float(m["Accm"]) == pytest.approx(100 * np.mean(pred == targets), rel=1e-6)


def test_scale_weights_normalised_per_token():
    w = var_loss.token_weights(PATCH_NUMS, (0.0, 1.0, 1.0, 2.0))
    assert w.shape == (L,) and w.sum() == pytest.approx(1.0)
    assert w[0] == 0 and w[-1] == pytest.approx(2 * w[1])
    with pytest.raises(ValueError, match="scale_weights"):
        var_loss.token_weights(PATCH_NUMS, (1.0, 2.0))


def test_tokenizer_fn_matches_fixture_tokens_and_teacher_input():
    from var_jax.tokenizer.convert import vqvae_from_state_dict
    arrays, cfg = load_fixture("tiny")
    tok_cfg, vqvae = vqvae_from_state_dict(state_dict(arrays, "vae"), patch_nums=PATCH_NUMS)
    graphdef, tok_state = nnx.split(vqvae)
    tokenize = var_step.make_tokenizer_fn(graphdef, tok_cfg)
    images = jnp.asarray(arrays["vae_img"].transpose(0, 2, 3, 1))
    tokens, teacher = jax.jit(tokenize)(tok_state, images)
    np.testing.assert_array_equal(np.asarray(tokens), arrays["var_gt_BL"])
    np.testing.assert_allclose(np.asarray(teacher), arrays["var_x_BLCv_wo_first_l"], atol=1e-5)


def _setup(var_cfg, step_cfg, mesh=None):
    mesh = mesh or make_mesh((1, 1, 1))
    model_fn = lambda rngs: VAR(var_cfg, rngs=rngs)
    parts = model_parts(model_fn)
    mask = optimizer.decay_mask(parts.param_vars)
    tx = optimizer.make_optimizer(optim_cfg(), batch_size=4, total_steps=10, mask=mask)
    layout = abstract_train_state(parts, tx, mesh)
    state = init_train_state(model_fn, tx, layout, mesh, seed=0)
    return parts, tx, layout, state, mesh


def _random_batch(rng, batch=4, ramp=None):
    out = {"tokens": rng.integers(0, 64, size=(batch, L)).astype(np.int32),
           "teacher_input": rng.normal(size=(batch, L - 1, 8)).astype(np.float32),
           "label": rng.integers(0, 10, size=(batch,)).astype(np.int32)}
    if ramp is not None:
        out["loss_ramp"] = np.float32(ramp)
    return out


def test_step_equals_independent_update():
    rng = np.random.default_rng()
    step_cfg = var_step.VarStepConfig(patch_nums=PATCH_NUMS)
    parts, tx, layout, state, mesh = _setup(tiny_var_config(), step_cfg)
    batch = _random_batch(rng)
    params0 = jax.tree.map(np.asarray, state.params)
    opt0 = jax.tree.map(np.asarray, state.opt_state)

    def ref_loss(params):
        logits = parts.merge(params)(jnp.asarray(batch["label"]), jnp.asarray(batch["teacher_input"]))
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(batch["tokens"])[..., None], -1))

    @jax.jit
    def ref_update(params, opt_state):
        loss, grads = jax.value_and_grad(ref_loss)(params)
        updates, _ = tx.update(grads, opt_state, params)
        return loss, optax.tree.norm(grads), optax.apply_updates(params, updates)

    loss_want, grad_norm_want, params_want = ref_update(params0, opt0)

    step = jit_train_step(var_step.make_var_train_step(parts, tx, step_cfg), layout, mesh, batch)
    with jax.set_mesh(mesh):
        state, metrics = step(state, batch, None)
    assert int(state.step) == 1
    np.testing.assert_allclose(float(metrics["loss"]), float(loss_want), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["Lm"]), float(loss_want), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(grad_norm_want), rtol=1e-5)
    assert float(metrics["lr"]) == pytest.approx(3e-2 * 4 / 256, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6),
                 state.params, params_want)
    moved = [float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(state.params),
                                                                        jax.tree.leaves(params0))]
    assert max(moved) > 1e-4


def test_progressive_step_truncates_and_ramps():
    """prog_si=1: logits of the first two scales only (block-causal: equal to the full forward's prefix), the
    newest scale's weight multiplied by the ramp, weights kept at 1/L as in the reference."""
    rng = np.random.default_rng()
    prog_cfg = var_step.VarStepConfig(patch_nums=PATCH_NUMS, prog_si=1)
    parts, tx, layout, state, mesh = _setup(tiny_var_config(), prog_cfg)
    batch = _random_batch(rng, ramp=0.3)
    full_ce = jax.jit(lambda p, b: var_loss.token_cross_entropy(parts.merge(p)(b["label"], b["teacher_input"]),
                                                                 b["tokens"]))
    ce = np.asarray(full_ce(state.params, batch))
    w = np.full(5, 1.0 / L)
    w[1:5] *= 0.3
    want = np.mean(np.sum(ce[:, :5] * w, -1))
    step = jit_train_step(var_step.make_var_train_step(parts, tx, prog_cfg), layout, mesh, batch)
    with jax.set_mesh(mesh):
        _, metrics = step(state, batch, None)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["Lt"]), np.mean(ce[:, 1:5]), rtol=1e-5)


def reference_prog_si(g_it, wp_it, max_it, pg, pg0, num_scales):
    """train.py's progressive schedule (the candidate_prog_si=None branch)."""
    if g_it <= wp_it:
        return pg0
    if g_it >= max_it * pg:
        return num_scales - 1
    delta = num_scales - 1 - pg0
    progress = min(max((g_it - wp_it) / (max_it * pg - wp_it), 0), 1)
    return pg0 + round(progress * delta)


def test_progressive_schedule_matches_reference():
    sched = progressive.ProgressiveSchedule(num_scales=10, total_steps=500, warmup_steps=20, fraction=0.6,
                                            start_scale=4, ramp_steps=10)
    got = [sched.scale_at(s) for s in range(500)]
    want = [reference_prog_si(s, 20, 500, 0.6, 4, 10) for s in range(500)]
    assert got == want
    first_5 = got.index(5)
    assert sched.ramp_at(first_5) == pytest.approx(0.1)
    assert sched.ramp_at(first_5 + 4) == pytest.approx(0.5)
    assert sched.ramp_at(0) == 1.0 and sched.ramp_at(499) == 1.0
    off = dataclasses.replace(sched, fraction=0.0)
    assert not off.enabled and off.scale_at(3) == 9


def test_bfloat16_compute_keeps_float32_params_and_loss():
    """compute_dtype='bfloat16': activations in bf16, params / optimizer state / logits / loss in float32; the
    loss agrees with the float32 step to bf16 precision."""
    rng = np.random.default_rng()
    step_cfg = var_step.VarStepConfig(patch_nums=PATCH_NUMS)
    batch = _random_batch(rng)
    results = {}
    for dtype in ("float32", "bfloat16"):
        parts, tx, layout, state, mesh = _setup(tiny_var_config(compute_dtype=dtype), step_cfg)
        step = jit_train_step(var_step.make_var_train_step(parts, tx, step_cfg), layout, mesh, batch)
        with jax.set_mesh(mesh):
            state, metrics = step(state, batch, None)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
        assert metrics["loss"].dtype == jnp.float32
        results[dtype] = float(metrics["loss"])
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=2e-2)


def test_tree_all_finite_and_its_compiled_size():
    """tree_all_finite: False for a NaN or inf anywhere in a float leaf (integer leaves ignored); the update that
    reads it (finish_step's select per leaf) compiles to O(leaves) ops, not a per-leaf copy of the whole check."""
    from var_jax.train.state import tree_all_finite
    rng = np.random.default_rng()
    n = int(rng.integers(30, 60))
    tree = {f"w{i}": jnp.asarray(rng.normal(size=(2, int(rng.integers(1, 5)))), jnp.float32) for i in range(n)}
    tree["count"] = jnp.int32(3)
    assert bool(jax.jit(tree_all_finite)(tree))
    for bad in (np.nan, np.inf, -np.inf):
        leaf = f"w{rng.integers(n)}"
        broken = {**tree, leaf: tree[leaf].at[0, 0].set(bad)}
        assert not bool(jax.jit(tree_all_finite)(broken)), (leaf, bad)
    update = jax.jit(lambda t: jax.tree.map(lambda x: jnp.where(tree_all_finite(t), x * 2, x), t))
    hlo = update.lower(tree).compile().as_text()
    assert hlo.count(" and(") + hlo.count(" or(") + hlo.count(" not(") < 8 * n, n
