"""The block-sparse attention kernels (var_jax/transformer/block_sparse.py) in the Pallas interpreter on CPU:
splash (TPU) and the Pallas flash kernel (GPU), forward and gradients against the dense masked softmax computed in
float64, on fresh random inputs each run; and the model run with them gives the 'grouped' logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax.transformer import VAR, VARConfig
from var_jax.transformer import block_sparse
from var_jax.transformer.attention import QueryGroup, block_causal_groups, dense_mask, token_causal_groups
from var_jax.transformer.block_sparse import EMPTY, FULL, PARTIAL, block_plan, pallas_attention, splash_attention
from var_jax.transformer.blocks import SelfAttention

TOL = 1e-5   # float32 kernels against the float64 dense softmax


def random_qkv(length, batch=2, heads=2, head_dim=32):
    """q, k, v and an output cotangent d_out, float32 (B, L, H, hd), from a fresh generator."""
    rng = np.random.default_rng()
    return [jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32) for _ in range(4)]


def dense_reference(q, k, v, d_out, mask, scale):
    """softmax(q·kᵀ·scale masked)·v and its gradients w.r.t. q, k, v, in float64."""
    def attend(q, k, v):
        scores = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
    with jax.enable_x64(True):
        q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
        out, vjp = jax.vjp(attend, q, k, v)
        return [np.asarray(x) for x in (out, *vjp(d_out))]


def max_errors(fn, q, k, v, d_out, mask, scale):
    """Max |kernel − dense| of the output and of the q, k, v gradients."""
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    got = [out, *vjp(d_out)]
    return [float(np.abs(np.asarray(g) - w).max()) for g, w in zip(got, dense_reference(q, k, v, d_out, mask, scale))]


# ---- the tile table -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups, block", [(block_causal_groups((1, 2, 3, 4, 5, 6, 8)), 16),
                                           (block_causal_groups((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)), 64),
                                           (token_causal_groups(50), 16)])
def test_tile_table_matches_the_dense_mask(groups, block):
    plan = block_plan(groups, block)
    mask, kinds, n, length = plan.mask(), plan.kinds(), plan.num_blocks, plan.length
    assert plan.padded % block == 0 and 0 <= plan.padded - length < block
    assert (mask[:length, :length] == dense_mask(groups)).all()
    assert not mask[:, length:].any() and mask[length:, :length].all()   # padding keys hidden, padding rows see all
    tiles = mask.reshape(n, block, n, block).transpose(0, 2, 1, 3).reshape(n, n, -1)
    assert (kinds == np.where(tiles.all(-1), FULL, np.where(tiles.any(-1), PARTIAL, EMPTY))).all()
    kv_full, kv_needed = plan.kv_bounds()
    q_first, q_full = plan.q_bounds()
    j, i = np.meshgrid(np.arange(n), np.arange(n))
    assert (kinds == np.where(j < kv_full[:, None], FULL, np.where(j < kv_needed[:, None], PARTIAL, EMPTY))).all()
    assert (kinds == np.where(i < q_first[None], EMPTY, np.where(i < q_full[None], PARTIAL, FULL))).all()


@pytest.mark.parametrize("block, empty", [(64, 36), (128, 8)])
def test_256px_schedule_skips_tiles(block, empty):
    """L=680 (256 px): 38 % of the scores are masked; 36 of the 11×11 64-tiles, 8 of the 6×6 128-tiles are empty."""
    kinds = block_plan(block_causal_groups((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)), block).kinds()
    assert kinds.shape == (-(-680 // block),) * 2 and (kinds == EMPTY).sum() == empty


# ---- kernels against the dense softmax ------------------------------------------------------------------------------
@pytest.mark.parametrize("groups, block", [(block_causal_groups((1, 2, 3, 4, 5, 6, 8)), 16),
                                           (block_causal_groups((1, 2, 3, 4, 5, 6, 8)), 64),
                                           (token_causal_groups(40), 16)])
def test_pallas_kernel_and_its_gradients_equal_dense_softmax(groups, block):
    q, k, v, d_out = random_qkv(groups[-1].end)
    scale = q.shape[-1] ** -0.5   # scores of unit variance: float32 rounding stays well inside TOL
    fn = lambda q, k, v: pallas_attention(q, k, v, groups, scale, interpret=True, block=block)
    errors = max_errors(fn, q, k, v, d_out, dense_mask(groups), scale)
    assert max(errors) < TOL, errors


def test_splash_kernel_and_its_gradients_equal_dense_softmax():
    groups = block_causal_groups((1, 2, 3, 4, 5, 6, 8, 10, 13))   # L=424 in 128-tiles: 2 of the 16 are empty
    assert (block_plan(groups, block_sparse.SPLASH_BLOCK).kinds() == EMPTY).sum() == 2
    q, k, v, d_out = random_qkv(groups[-1].end)
    scale = q.shape[-1] ** -0.5   # scores of unit variance: float32 rounding stays well inside TOL
    fn = lambda q, k, v: splash_attention(q, k, v, groups, scale, interpret=True)
    errors = max_errors(fn, q, k, v, d_out, dense_mask(groups), scale)
    assert max(errors) < TOL, errors


def test_a_wrong_mask_is_far_outside_the_tolerance():
    """The comparison can fail: the kernel with every key visible against the block-causal reference."""
    groups = block_causal_groups((1, 2, 3, 4))
    q, k, v, d_out = random_qkv(groups[-1].end)
    everything = (QueryGroup(0, groups[-1].end, groups[-1].end, None),)
    fn = lambda q, k, v: pallas_attention(q, k, v, everything, 1.0, interpret=True, block=16)
    assert max_errors(fn, q, k, v, d_out, dense_mask(groups), 1.0)[0] > 100 * TOL


def test_kernels_refuse_other_backends_and_masks():
    groups = block_causal_groups((1, 2, 3))
    q = jnp.zeros((1, groups[-1].end, 2, 16))
    for impl, fn in (("splash", splash_attention), ("pallas", pallas_attention)):
        with pytest.raises(ValueError, match=f"'{impl}'.*'cpu'"):
            fn(q, q, q, groups, 1.0)
    reversed_causal = np.triu(np.ones((14, 14), bool))   # query 0 sees every key, the last only itself
    with pytest.raises(ValueError, match="prefix"):
        pallas_attention(q, q, q, (QueryGroup(0, 14, 14, reversed_causal),), 1.0, interpret=True)


# ---- through the model --------------------------------------------------------------------------------------------
def tiny_config(impl):
    # init_adaln_gamma 0.5: the attention branches change the logits (the 1e-5 default would hide them)
    return VARConfig(depth=2, width=64, heads=2, num_classes=5, vocab_size=32, z_channels=4,
                     patch_nums=(1, 2, 3, 4, 5, 6, 8, 10), init_adaln_gamma=0.5, attention_impl=impl)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_model_logits_with_the_kernels_equal_grouped(impl):
    model = VAR(tiny_config(impl), rngs=nnx.Rngs(0))
    grouped = nnx.clone(model)
    for _, module in nnx.iter_graph(grouped):
        if isinstance(module, SelfAttention):
            module.impl = "grouped"
    rng = np.random.default_rng()
    labels = rng.integers(0, 5, 2)
    teacher = rng.normal(size=(2, model.cfg.seq_len - 1, 4)).astype(np.float32)
    with block_sparse.interpret_mode():
        logits = nnx.jit(lambda m: m(labels, teacher))(model)
    want = nnx.jit(lambda m: m(labels, teacher))(grouped)
    # relative to the largest logit (~0.05 at this init); dropping the mask moves the logits ~1 % of it
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=TOL * np.abs(want).max(), rtol=0)


def test_runtime_masks_take_the_existing_path():
    """KV-cache steps pass a bool mask or none: 'pallas' / 'splash' fall back, with no kernel and no error on CPU."""
    q, k, v, _ = random_qkv(12)
    mask = jnp.asarray(np.random.default_rng().random((1, 1, 12, 12)) < 0.7).at[..., 0].set(True)
    outs = {}
    for impl in ("grouped", "pallas", "splash"):
        attn = SelfAttention(tiny_config(impl), rngs=nnx.Rngs(0))
        outs[impl] = [np.asarray(attn.attend(q, k, v, m)) for m in (mask, None)]
    for impl in ("pallas", "splash"):
        for got, want in zip(outs[impl], outs["grouped"]):
            np.testing.assert_array_equal(got, want)
