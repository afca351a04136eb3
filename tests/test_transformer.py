"""VAR transformer: parameter counts, KV-cached == masked forward, init statistics, config checks, dropout
switches, mixed precision, remat, logical axis names / sharding. Logit parity with the recorded reference is in
test_var_convert.py (it needs the converter)."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_fixture, run_with_devices, state_dict
from var_jax.transformer import VAR, VARConfig, preset
from var_jax.transformer.config import PATCH_NUMS_512
from var_jax.transformer.convert import var_from_state_dict

TINY = dict(depth=2, width=64, heads=4, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4))


@functools.cache
def converted(name):
    """The reference fixture's VAR (random weights; tiny_stress and small_shared exercise the blocks)."""
    arrays, config = load_fixture(name)
    cfg, model = var_from_state_dict(state_dict(arrays, "var"), heads=config["num_heads"])
    return arrays, cfg, model


def with_config(model, **changes):
    """A copy of `model` (same weights) whose behaviour flags (rates, remat, ...) are changed."""
    copy = nnx.clone(model)
    copy.cfg = dataclasses.replace(copy.cfg, **changes)
    return copy


@nnx.jit(static_argnames=("deterministic", "num_scales"))
def forward(model, labels, teacher, cond_drop_key=None, dropout_key=None, deterministic=True, num_scales=None):
    return model(labels, teacher, cond_drop_key=cond_drop_key, dropout_key=dropout_key,
                 deterministic=deterministic, num_scales=num_scales)


def random_inputs(cfg, batch, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, cfg.num_classes + 1, batch)
    teacher = rng.normal(size=(batch, cfg.seq_len - cfg.first_l, cfg.z_channels)).astype(np.float32)
    return labels, teacher


# ---- shapes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, overrides, expected", [
    (16, {}, 310_283_520), (20, {}, 600_917_136), (24, {}, 1_033_399_360), (30, {}, 2_010_020_356),
    (36, dict(shared_aln=True, patch_nums=PATCH_NUMS_512), 2_353_893_904)])
def test_param_counts_match_reference(depth, overrides, expected):
    cfg = preset(depth, **overrides)
    abstract = nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0)))
    assert abstract.num_params() == expected


def test_config_resolution_and_serialisation():
    cfg = VARConfig(depth=16)
    assert (cfg.width, cfg.heads, cfg.head_dim, cfg.seq_len, cfg.first_l, cfg.num_scales) == (1024, 16, 64, 680, 1, 10)
    assert cfg.drop_path_rate == pytest.approx(0.1 * 16 / 24)
    assert cfg.init_std == pytest.approx(math.sqrt(1 / (3 * 1024)))
    assert len(cfg.scale_ids) == 680 and cfg.scale_ids[:6] == (0, 1, 1, 1, 1, 2) and cfg.scale_ids[-1] == 9
    assert VARConfig.from_dict(cfg.to_dict()) == cfg and hash(VARConfig.from_dict(cfg.to_dict())) == hash(cfg)
    assert preset(36).shared_aln and preset(36).seq_len == 2240 and preset(24).init_adaln_gamma == 1e-4
    assert preset(12).width == 768 and preset(12, heads=6).head_dim == 128 and preset(2).width == 128


@pytest.mark.parametrize("kwargs, field", [
    (dict(depth=2, width=64, heads=3), "width"),
    (dict(depth=2, patch_nums=(1, 3, 2)), "patch_nums"),
    (dict(depth=2, remat="everything"), "remat"),
    (dict(depth=2, compute_dtype="float16"), "compute_dtype"),
    (dict(depth=2, cond_drop_rate=1.5), "cond_drop_rate"),
    (dict(depth=0), "depth")])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"VARConfig.{field}"):
        VARConfig(**kwargs)


def test_config_rejects_unknown_fields_and_depths():
    with pytest.raises(ValueError, match="unknown field"):
        VARConfig.from_dict({"depth": 2, "widht": 64})
    with pytest.raises(ValueError, match="depth"):
        preset(0)


# ---- KV cache -----------------------------------------------------------------------------------------------------
@nnx.jit(static_argnames=("traced", "short_cache"))
def cached_logits(model, labels, teacher, starts, traced, short_cache=False):
    """Scale by scale through the KV cache. traced: the starts are traced values (masked attention over kv_len
    cache positions); otherwise Python ints (the cache sliced to the exact length). short_cache: the cache ends
    where the last scale begins, so that scale is never stored (the sampler's unrolled form)."""
    cfg = model.cfg
    cond = model.cond_embedding(labels)
    length = cfg.scale_begin_ends[-1][0] if short_cache else None
    cache, outs = model.init_cache(labels.shape[0], jnp.float32, length=length), []
    for si, (begin, end) in enumerate(cfg.scale_begin_ends):
        x = model.first_scale_input(cond) if si == 0 else model.scale_input(si, teacher[:, begin - 1:end - 1])
        # traced: attend over a static kv_len that covers this scale, shorter than L except at the last scale
        # (kv_len = L with a traced start is exercised by test_kv_cache_padding_rows_are_ignored)
        kv_len = min(end + 1, cfg.seq_len)
        logits, cache = model.forward_cached(x, cond, cache, starts[si] if traced else begin, kv_len=kv_len)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", ["tiny_stress", "small_shared"])
def test_kv_cached_forward_equals_masked_forward(name):
    _, cfg, model = converted(name)
    labels, teacher = random_inputs(cfg, 3, seed=len(name))
    masked = np.asarray(forward(model, labels, teacher))
    tol = 1e-5 * max(np.abs(masked).max(), 1.0)
    starts = jnp.array([begin for begin, _ in cfg.scale_begin_ends], jnp.int32)
    for traced in (False, True):
        np.testing.assert_allclose(cached_logits(model, labels, teacher, starts, traced), masked, atol=tol, rtol=0)
    short = cached_logits(model, labels, teacher, starts, False, short_cache=True)
    np.testing.assert_allclose(short, masked, atol=tol, rtol=0)
    # the same values a stored last scale gives, not merely close
    np.testing.assert_array_equal(short, cached_logits(model, labels, teacher, starts, False))


def test_kv_cache_padding_rows_are_ignored():
    """valid_len < l: padding rows after the real tokens change neither the real rows' logits nor later scales."""
    _, cfg, model = converted("tiny_stress")
    labels, teacher = random_inputs(cfg, 2, seed=5)
    masked = np.asarray(forward(model, labels, teacher))

    @nnx.jit
    def run(model, labels, teacher, start1):
        cond = model.cond_embedding(labels)
        _, cache = model.forward_cached(model.first_scale_input(cond), cond, model.init_cache(2), 0)
        begin, end = cfg.scale_begin_ends[1]
        x = model.scale_input(1, teacher[:, begin - 1:end - 1])
        padded = jnp.concatenate([x, jnp.full((2, 3, cfg.width), 7.0)], axis=1)
        first, cache = model.forward_cached(padded, cond, cache, start1, valid_len=end - begin)
        begin2, end2 = cfg.scale_begin_ends[2]
        second, _ = model.forward_cached(model.scale_input(2, teacher[:, begin2 - 1:end2 - 1]), cond, cache, begin2)
        return first[:, :end - begin], second

    first, second = run(model, labels, teacher, jnp.int32(1))
    np.testing.assert_allclose(first, masked[:, 1:5], atol=1e-5, rtol=0)
    np.testing.assert_allclose(second, masked[:, 5:14], atol=1e-5, rtol=0)


def test_bad_inputs_name_the_problem():
    _, cfg, model = converted("tiny")
    cond = model.cond_embedding(jnp.array([1]))
    with pytest.raises(ValueError, match="outside"):
        model.forward_cached(jnp.zeros((1, 16, cfg.width)), cond, model.init_cache(1), 20)
    with pytest.raises(ValueError, match="kv_len"):
        model.forward_cached(jnp.zeros((1, 16, cfg.width)), cond, model.init_cache(1), jnp.int32(14), kv_len=8)
    with pytest.raises(ValueError, match="neither fit the cache"):   # would skip cached position 4
        model.forward_cached(jnp.zeros((1, 9, cfg.width)), cond, model.init_cache(1, length=4), 5)
    with pytest.raises(ValueError, match="length"):
        model.init_cache(1, length=cfg.seq_len + 1)
    with pytest.raises(ValueError, match="teacher_input"):
        model(jnp.array([1, 2]), jnp.zeros((2, 29, 7)))
    with pytest.raises(ValueError, match="x_in"):
        model.scale_input(2, jnp.zeros((2, 4, cfg.z_channels)))
    with pytest.raises(ValueError, match="num_scales"):
        model(jnp.array([1, 2]), jnp.zeros((2, 29, cfg.z_channels)), num_scales=5)


# ---- teacher forcing behaviour ------------------------------------------------------------------------------------
def test_prefix_of_scales_equals_prefix_of_logits():
    """Block-causality: the first k scales' logits do not depend on later scales."""
    _, cfg, model = converted("tiny_stress")
    labels, teacher = random_inputs(cfg, 2, seed=11)
    full = np.asarray(forward(model, labels, teacher))
    end = cfg.prefix_len(3)
    np.testing.assert_allclose(forward(model, labels, teacher, num_scales=3), full[:, :end], atol=1e-5, rtol=0)
    np.testing.assert_allclose(forward(model, labels, teacher[:, :end - 1], num_scales=3), full[:, :end],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(forward(model, labels, teacher[:, :0], num_scales=1), full[:, :1], atol=1e-5, rtol=0)
    changed = teacher.copy()
    changed[:, end - 1:] += 1.0
    changed_logits = np.asarray(forward(model, labels, changed))
    np.testing.assert_allclose(changed_logits[:, :end], full[:, :end], atol=1e-5, rtol=0)
    assert np.abs(changed_logits[:, end:] - full[:, end:]).max() > 1e-3


def test_class_dropout_only_when_asked():
    _, cfg, model = converted("tiny_stress")
    _, teacher = random_inputs(cfg, 4, seed=3)
    labels = np.array([0, 1, 2, 3])
    cond_logits = np.asarray(forward(model, labels, teacher))
    null_logits = np.asarray(forward(model, np.full(4, cfg.num_classes), teacher))
    assert np.abs(cond_logits - null_logits).max() > 1e-3
    half = with_config(model, cond_drop_rate=0.5)
    np.testing.assert_array_equal(forward(half, labels, teacher, cond_drop_key=jax.random.key(0)), cond_logits)
    dropped = []
    for seed in range(4):
        out = np.asarray(forward(half, labels, teacher, cond_drop_key=jax.random.key(seed), deterministic=False))
        for b in range(4):
            is_null = np.allclose(out[b], null_logits[b], atol=1e-6)
            assert is_null != np.allclose(out[b], cond_logits[b], atol=1e-6)
            dropped.append(is_null)
    assert 0 < sum(dropped) < 16   # 16 fair coins (fixed keys): both outcomes occur
    zero = with_config(model, cond_drop_rate=0.0)
    np.testing.assert_array_equal(
        forward(zero, labels, teacher, cond_drop_key=jax.random.key(0), deterministic=False), cond_logits)


def scale_last_block_gates(model, attn_factor, ffn_factor):
    """A copy whose last block's residual gates gamma1/gamma2 are multiplied by the given factors."""
    graphdef, state = nnx.split(nnx.clone(model))   # split shares the Variables: never edit the cached model
    C = model.cfg.width
    factors = np.ones(6 * C, np.float32)
    factors[:C], factors[C:2 * C] = attn_factor, ffn_factor
    for name in ("kernel", "bias"):
        var = state["blocks"]["ada_lin"][name]
        value = np.array(var.get_value())
        value[-1] *= factors
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


def test_drop_path_switch():
    """Drop-path on the last of 2 blocks (rates linear 0 -> 0.5): per sample, each residual branch is dropped or
    scaled by 1/keep = 2; block 0 (rate 0) is untouched. Known answer: every sample equals one of the four
    models whose last-block gates are scaled by (0 or 2, 0 or 2)."""
    _, cfg, model = converted("tiny_stress")
    model = with_config(model, drop_path_rate=0.5)
    labels, teacher = random_inputs(cfg, 16, seed=4)
    base = np.asarray(forward(model, labels, teacher))
    key = jax.random.key(1)
    np.testing.assert_array_equal(forward(model, labels, teacher, dropout_key=key), base)
    out = np.asarray(forward(model, labels, teacher, dropout_key=key, deterministic=False))
    np.testing.assert_array_equal(forward(model, labels, teacher, dropout_key=key, deterministic=False), out)
    combos = [(a, f) for a in (0.0, 2.0) for f in (0.0, 2.0)]
    candidates = [np.asarray(forward(scale_last_block_gates(model, a, f), labels, teacher)) for a, f in combos]
    seen = set()
    for b in range(16):
        match = [i for i, c in enumerate(candidates) if np.allclose(out[b], c[b], atol=1e-5)]
        assert len(match) == 1, (b, match)
        seen.add(match[0])
    assert len(seen) >= 3   # 16 samples, 4 equally likely outcomes (fixed key)


def test_remat_gives_the_same_gradients():
    _, cfg, model = converted("tiny_stress")
    labels, teacher = random_inputs(cfg, 2, seed=9)
    targets = np.random.default_rng(9).integers(0, cfg.vocab_size, (2, cfg.seq_len))

    def grads(model):
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(labels, teacher)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(model), grads(with_config(model, remat="block"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), plain, remat)
    assert np.abs(np.asarray(plain["blocks"]["attn"]["mat_qkv"]["kernel"])).max() > 1e-4


def test_bfloat16_compute_is_close_and_params_stay_float32():
    arrays, cfg, model = converted("tiny_stress")
    ref = arrays["var_logits_BLV"]
    _, model16 = var_from_state_dict(state_dict(arrays, "var"), compute_dtype="bfloat16")
    logits = forward(model16, arrays["var_label_B"], arrays["var_x_BLCv_wo_first_l"])
    assert logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    err = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
    assert 1e-5 < err < 5e-2, err   # bf16 really used, and still close


# ---- initialisation -----------------------------------------------------------------------------------------------
def check_std(x, want, rel=0.05):
    assert np.std(np.asarray(x)) == pytest.approx(want, rel=rel)


def test_init_statistics_follow_reference_rules():
    C, depth = 128, 2
    cfg = VARConfig(depth=depth, width=C, heads=2, num_classes=20, vocab_size=256, z_channels=8, patch_nums=(1, 2, 4),
                    init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02)
    model = nnx.jit(lambda: VAR(cfg, rngs=nnx.Rngs(7)))()
    std = math.sqrt(1 / (3 * C))
    assert cfg.init_std == pytest.approx(std)
    check_std(model.class_emb.embedding, std, rel=0.1)
    check_std(model.pos_1LC, std, rel=0.1)
    check_std(model.head.kernel, 0.02 * std)
    check_std(model.head_nm.ada_lin.kernel, 0.5 * std)
    check_std(model.blocks.attn.mat_qkv.kernel, std)
    check_std(model.blocks.ffn.fc1.kernel, std)
    check_std(model.blocks.attn.proj.kernel, std / math.sqrt(2 * depth))
    check_std(model.blocks.ffn.fc2.kernel, std / math.sqrt(2 * depth))
    ada = np.asarray(model.blocks.ada_lin.kernel)      # (layers, C, 6C): the gates are the first 2C outputs
    check_std(ada[..., :2 * C], 1e-3 * std)
    check_std(ada[..., 2 * C:], 0.5 * std)
    for bias in (model.head.bias, model.blocks.attn.q_bias, model.blocks.attn.v_bias, model.blocks.ada_lin.bias,
                 model.blocks.attn.proj.bias, model.word_embed.bias):
        assert np.all(np.asarray(bias) == 0)
    np.testing.assert_allclose(model.blocks.attn.scale_mul, np.log(4.0), rtol=1e-6)
    qkv = np.asarray(model.blocks.attn.mat_qkv.kernel)
    assert not np.allclose(qkv[0], qkv[1])   # stacked blocks are drawn independently


def test_shared_adaln_init():
    C = 128
    cfg = VARConfig(depth=2, width=C, heads=2, num_classes=5, vocab_size=32, z_channels=4, patch_nums=(1, 2),
                    shared_aln=True, attn_l2_norm=False, init_adaln=0.5, init_adaln_gamma=1e-2)
    model = nnx.jit(lambda: VAR(cfg, rngs=nnx.Rngs(2)))()
    gss = np.asarray(model.blocks.ada_gss).reshape(2, 6, C)   # reference: randn/sqrt(C), gates × alng, rest × aln
    check_std(gss[:, :2], 1e-2 / math.sqrt(C), rel=0.1)
    check_std(gss[:, 2:], 0.5 / math.sqrt(C), rel=0.1)
    check_std(model.shared_ada_lin.kernel, cfg.init_std)     # the shared linear is not rescaled
    assert not hasattr(model.blocks, "ada_lin") and not hasattr(model.blocks.attn, "scale_mul")


# ---- logical axes and sharding ------------------------------------------------------------------------------------
def test_every_parameter_has_logical_axis_names():
    for shared in (False, True):
        model = nnx.eval_shape(lambda: VAR(VARConfig(**TINY, shared_aln=shared), rngs=nnx.Rngs(0)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            shape = var.get_value().shape
            assert names is not None and len(names) == len(shape), (path, names, shape)
            assert path[0] != "blocks" or names[0] == "layers", path


def test_state_shardings_on_a_2x2x2_mesh():
    code = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from conftest import load_fixture, state_dict
from var_jax.sharding import batch_sharding, make_mesh, state_shardings
from var_jax.transformer.convert import var_from_state_dict
arrays, _ = load_fixture("tiny_stress")
cfg, model = var_from_state_dict(state_dict(arrays, "var"))
graphdef, state = nnx.split(model)
mesh = make_mesh((2, 2, 2))
shardings = dict(nnx.to_flat_state(state_shardings(state, mesh)))
for path in [("blocks", "attn", "mat_qkv", "kernel"), ("blocks", "ffn", "fc1", "kernel"),
             ("blocks", "ffn", "fc2", "kernel"), ("blocks", "ada_lin", "kernel"), ("head", "kernel"), ("pos_1LC",)]:
    s = shardings[path]
    print(".".join(path), tuple(s.get_value().spec if hasattr(s, "get_value") else s.spec))
fwd = jax.jit(lambda s, l, t: nnx.merge(graphdef, s)(l, t))
labels, teacher = jnp.arange(8) % 11, jax.random.normal(jax.random.key(0), (8, cfg.seq_len - 1, cfg.z_channels))
ref = fwd(state, labels, teacher)
sharded = jax.device_put(state, state_shardings(state, mesh))
qkv = dict(nnx.to_flat_state(sharded))[("blocks", "attn", "mat_qkv", "kernel")].get_value()
print("qkv_shard_shape", qkv.addressable_shards[0].data.shape)
print("maxdiff", float(jnp.abs(fwd(sharded, labels, teacher) - ref).max()))
with jax.set_mesh(mesh):   # activation constraints apply under a mesh context
    fwd_in_mesh = jax.jit(lambda s, l, t: nnx.merge(graphdef, s)(l, t))
    out = fwd_in_mesh(sharded, jax.device_put(labels, batch_sharding(mesh, 1)),
                      jax.device_put(teacher, batch_sharding(mesh, 3)))
print("mesh_maxdiff", float(jnp.abs(out - ref).max()))
print("logits_spec", tuple(out.sharding.spec))
"""
    out = dict(line.split(" ", 1) for line in run_with_devices(code, 8).strip().splitlines())
    assert out["blocks.attn.mat_qkv.kernel"] == "(None, 'fsdp', 'tensor')"
    assert out["blocks.ffn.fc1.kernel"] == "(None, 'fsdp', 'tensor')"
    assert out["blocks.ffn.fc2.kernel"] == "(None, 'tensor', 'fsdp')"
    assert out["blocks.ada_lin.kernel"] == "(None, 'fsdp', 'tensor')"
    assert out["head.kernel"] == "('fsdp', 'tensor')"
    assert out["pos_1LC"] == "(None, None, 'fsdp')"
    assert out["qkv_shard_shape"] == "(2, 32, 96)"   # (layers, C/fsdp, 3C/tensor)
    assert float(out["maxdiff"]) < 1e-5 and float(out["mesh_maxdiff"]) < 1e-5
    assert out["logits_spec"] == "(('data', 'fsdp'), None, 'tensor')"


# ---- attention ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_nums, min_group", [((1, 2, 3, 4, 5), 16), ((1, 2, 3, 4, 5), 1), ((1, 2, 3), 100)])
def test_grouped_attention_and_its_vjp_equal_dense_masked_softmax(patch_nums, min_group):
    """Query groups + custom VJP == softmax(q·kᵀ·scale masked block-causally)·v and its autodiff, in float64."""
    from var_jax.transformer.attention import block_causal_groups, dense_mask, grouped_attention
    from var_jax.transformer.model import block_causal_mask
    groups = block_causal_groups(patch_nums, min_group)
    scale_ids = np.repeat(np.arange(len(patch_nums)), [p * p for p in patch_nums])
    mask = block_causal_mask(scale_ids)
    assert (dense_mask(groups) == mask).all()
    with jax.enable_x64(True):
        rng = np.random.default_rng()
        q, k, v, d_out = (jnp.asarray(rng.normal(size=(2, len(scale_ids), 3, 4))) for _ in range(4))

        def reference(q, k, v):
            scores = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.7, -jnp.inf)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)

        grouped = lambda q, k, v: grouped_attention(q, k, v, groups, 0.7)
        np.testing.assert_allclose(grouped(q, k, v), reference(q, k, v), atol=1e-12)
        grads = [jax.grad(lambda *a: (f(*a) * d_out).sum(), argnums=(0, 1, 2))(q, k, v) for f in (grouped, reference)]
        for got, want in zip(*grads):
            np.testing.assert_allclose(got, want, atol=1e-11)


@pytest.mark.parametrize("impl", ["xla", "grouped"])
def test_attention_backends_reproduce_the_recorded_logits(impl):
    """jax.nn.dot_product_attention (the GPU/TPU path of attention_impl='auto') and the grouped CPU path."""
    arrays, _, model = converted("tiny_stress")
    model = nnx.clone(model)
    attentions = [m for _, m in nnx.iter_graph(model) if hasattr(m, "impl")]
    assert attentions, "no attention module found"
    for module in attentions:
        module.impl = impl
    logits = forward(model, arrays["var_label_B"], arrays["var_x_BLCv_wo_first_l"])
    np.testing.assert_allclose(np.asarray(logits), arrays["var_logits_BLV"], atol=1e-4, rtol=0)
