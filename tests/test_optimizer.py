"""The optax recipe against the reference: lr/wd schedules (lr_control.py formulas, float64), the no-decay set,
and several clipped AdamW steps against torch.optim.AdamW with the reference's two parameter groups."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from var_jax.train import optimizer


def optim_cfg(**kw):
    cfg = ml_collections.ConfigDict(dict(tblr=1e-4, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=-1, warmup_fraction=0.02,
                                         wp0=0.005, wpe=0.1, schedule="lin0", wd=0.05, wd_end=0.08, grad_clip=2.0))
    cfg.update(kw)
    return cfg


def reference_lr(it, peak, wp_it, max_it, wp0, wpe, sche="lin0"):
    """lr_wd_annealing(sche, ...) of the reference's utils/lr_control.py, for 'lin0' and 'lin<T>'."""
    wp_it = round(wp_it)
    if it < wp_it:
        return peak * (wp0 + (1 - wp0) * it / wp_it)
    passed = (it - wp_it) / (max_it - 1 - wp_it)
    if sche == "lin0":
        if passed < 0.05:
            return peak
        return peak * (wpe + (1 - wpe) * (1 - passed) / 0.95)
    t = float(sche[3:])
    mid = (1 + wpe + (1 - wpe) * (1 - t)) / 2
    if passed < t:
        return peak * (1 + (mid - 1) * passed / t)
    return peak * (wpe + (mid - wpe) * (1 - passed) / (1 - t))


def reference_wd(it, wd, wd_end, max_it):
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / (max_it - 1)))


@pytest.mark.parametrize("total,batch,warmup", [(1000, 768, 20), (347, 64, 7), (50, 256, 0)])
def test_lr_schedule_matches_reference_lin0(total, batch, warmup):
    cfg = optim_cfg(warmup_steps=warmup)
    sched = optimizer.learning_rate_schedule(cfg, batch, total)
    peak = 1e-4 * batch / 256
    steps = np.arange(total)
    got = np.asarray(jax.vmap(sched)(jnp.asarray(steps)))
    want = np.array([reference_lr(int(s), peak, warmup, total, 0.005, 0.1) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
    assert got[-1] == pytest.approx(0.1 * peak, rel=1e-5)
    if warmup:
        assert got[0] == pytest.approx(0.005 * peak, rel=1e-5)


@pytest.mark.parametrize("sche,total,warmup", [("lin0.8", 500, 10), ("lin0.05", 347, 7), ("lin00", 120, 0),
                                                ("lin0.333333", 999, 20), ("lin1", 200, 4)])
def test_lr_schedule_matches_reference_lin_fraction(sche, total, warmup):
    cfg = optim_cfg(warmup_steps=warmup, schedule=sche, wpe=0.01)
    got = np.asarray(jax.vmap(optimizer.learning_rate_schedule(cfg, 512, total))(jnp.arange(total)))
    steps = range(total - 1) if sche == "lin1" else range(total)   # the reference's lin1 divides 0 by 0 at the end
    want = [reference_lr(s, 2e-4, warmup, total, 0.005, 0.01, sche) for s in steps]
    np.testing.assert_allclose(got[:len(want)], want, rtol=2e-5, atol=1e-12)
    if sche == "lin1":   # its first line continued: the midpoint (1 + wpe) / 2 at the last step
        assert got[-1] == pytest.approx(2e-4 * (1 + 0.01) / 2, rel=1e-5)


def test_lin0_is_not_lin_fraction_zero_and_bad_fractions_are_named():
    lin0 = optimizer.learning_rate_schedule(optim_cfg(warmup_steps=0), 256, 100)
    lin00 = optimizer.learning_rate_schedule(optim_cfg(warmup_steps=0, schedule="lin0.0"), 256, 100)
    assert float(lin0(3)) == pytest.approx(1e-4) and float(lin00(3)) < 1e-4   # 5 % flat vs a straight line
    for bad in ("lin1.5", "lin", "lin-0.2", "linear"):
        with pytest.raises(ValueError, match=r"optim\.schedule: unknown schedule"):
            optimizer.learning_rate_schedule(optim_cfg(schedule=bad), 256, 100)


def test_warmup_fraction_and_constant_schedule():
    cfg = optim_cfg(warmup_fraction=0.1, schedule="constant")
    assert optimizer.warmup_steps(cfg, 200) == 20
    sched = optimizer.learning_rate_schedule(cfg, 256, 200)
    assert float(sched(100)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="optim.schedule"):
        optimizer.learning_rate_schedule(optim_cfg(schedule="cosine-ish"), 256, 200)


def test_weight_decay_cosine_matches_reference():
    sched = optimizer.weight_decay_schedule(optim_cfg(wd=0.05, wd_end=0.08), 400)
    for it in (0, 1, 57, 199, 200, 398, 399):
        assert float(sched(it)) == pytest.approx(reference_wd(it, 0.05, 0.08, 400), rel=1e-6)


class _Named(nnx.Module):
    """Parameters named like the VAR's, to check the reference's no-decay rules."""
    def __init__(self, rngs):
        p = lambda *shape, names=None: nnx.Param(jax.random.normal(rngs.params(), shape), out_sharding=names)
        self.pos_start = p(1, 1, 8)
        self.pos_1LC = p(1, 5, 8)
        self.lvl_embed = p(3, 8)
        self.class_emb = p(11, 8)
        self.word_embed = nnx.Dict(kernel=p(4, 8), bias=p(8))
        self.head = nnx.Dict(kernel=p(8, 16), bias=p(16))
        self.scale_mul = p(1, 2, 1, 1)
        self.ada_gss = p(1, 1, 6, 8)
        self.blocks = nnx.Dict(fc1_kernel=p(2, 8, 32, names=("layers", "embed", "mlp")),
                              fc1_bias=p(2, 32, names=("layers", "mlp")),
                              norm_scale=p(2, 8, names=("layers", "embed")))


def test_decay_mask_follows_reference_no_decay_set():
    _, params, _ = nnx.split(_Named(nnx.Rngs(0)), nnx.Param, ...)
    mask = optimizer.decay_mask(params)
    flat = {".".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(mask).items()}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == ["blocks.fc1_kernel", "class_emb", "head.kernel", "word_embed.kernel"], flat


def test_adamw_steps_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    total, batch = 12, 64
    cfg = optim_cfg(warmup_steps=3, tblr=3e-2, wd=0.05, wd_end=0.2, grad_clip=0.5)
    params = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    mask = {"w": True, "b": False}
    tx = optimizer.make_optimizer(cfg, batch_size=batch, total_steps=total, mask=mask)
    state = tx.init(params)
    tw = torch.nn.Parameter(torch.tensor(params["w"]))
    tb = torch.nn.Parameter(torch.tensor(params["b"]))
    topt = torch.optim.AdamW([{"params": [tw], "wd_sc": 1.0}, {"params": [tb], "wd_sc": 0.0}],
                             lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    peak = 3e-2 * batch / 256
    jparams = jax.tree.map(jnp.asarray, params)
    for it in range(total):
        grads = {"w": rng.normal(size=(6, 5)).astype(np.float32) * 3, "b": rng.normal(size=(5,)).astype(np.float32)}
        for g in topt.param_groups:
            g["lr"] = reference_lr(it, peak, 3, total, 0.005, 0.1)
            g["weight_decay"] = reference_wd(it, 0.05, 0.2, total) * g["wd_sc"]
        tw.grad, tb.grad = torch.tensor(grads["w"]), torch.tensor(grads["b"])
        torch.nn.utils.clip_grad_norm_([tw, tb], 0.5)
        topt.step()
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, jparams)
        jparams = jax.tree.map(lambda p, u: p + u, jparams, updates)
        hp = optimizer.current_hyperparams(state)
        assert float(hp["lr"]) == pytest.approx(reference_lr(it, peak, 3, total, 0.005, 0.1), rel=1e-5)
    np.testing.assert_allclose(np.asarray(jparams["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jparams["b"]), tb.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(jparams["w"]), params["w"], atol=1e-3)   # it did move
