"""The VQVAE tokenizer against the recorded reference outputs, float64 references and known answers."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_fixture, run_with_devices, state_dict
from test_resize import area_loop
from var_jax.tokenizer import quantizer as Q
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.convert import vqvae_from_state_dict
from var_jax.tokenizer.vqvae import VQVAE, merge_for_decoding, split_for_decoding

FEATURE_ATOL = 1e-4
IMAGE_ATOL = 1e-4


def nhwc(x):
    return np.transpose(x, (*range(x.ndim - 3), x.ndim - 2, x.ndim - 1, x.ndim - 3))


@functools.partial(jax.jit, static_argnums=0)
def _reference_pipeline(graphdef, state, img, ar_tokens):
    """Everything the fixtures recorded, in one compiled call per configuration."""
    model = nnx.merge(graphdef, state)
    cfg, qp = model.cfg, model.quantizer_params()
    enc = model.encoder(img)
    f = model.quant_conv(enc)   # = model.encode(img), without running the encoder twice
    tokens, f_hats = Q.f_to_tokens(qp, f, cfg)
    teacher = Q.teacher_forcing_input(qp, tokens, cfg)
    f_hat, ar_fhats = jnp.zeros_like(f), []
    for si, pn in enumerate(cfg.patch_nums):
        f_hat, _ = Q.next_scale_input(qp, cfg, si, f_hat, Q.embed_tokens(qp, ar_tokens[si], pn))
        ar_fhats.append(f_hat)
    # one decoder call for every scale's f_hat and the sampled one (a single decoder in the compiled program)
    decoded = model.decode(jnp.concatenate([*f_hats, f_hat])).reshape(cfg.num_scales + 1, *img.shape)
    return dict(enc=enc, f=f, tokens=tokens, f_hats=f_hats, per_scale=decoded[:-1], teacher=teacher,
                ar_fhats=jnp.stack(ar_fhats), ar_img=decoded[-1], tokens_to_fhat=Q.tokens_to_fhat(qp, tokens, cfg))


_OUTPUTS = {}


def reference_outputs(name):
    """(arrays, config, our outputs) for a fixture; computed once per session."""
    if name not in _OUTPUTS:
        arrays, config = load_fixture(name)
        cfg, model = vqvae_from_state_dict(state_dict(arrays, "vae"), patch_nums=tuple(config["patch_nums"]))
        graphdef, params = nnx.split(model)
        ar_tokens = [jnp.asarray(arrays[f"ar_idx_{k}"], jnp.int32) for k in range(cfg.num_scales)]
        out = jax.tree.map(np.asarray, _reference_pipeline(graphdef, params, jnp.asarray(nhwc(arrays["vae_img"])),
                                                           ar_tokens))
        _OUTPUTS[name] = arrays, config, cfg, out
    return _OUTPUTS[name]


FIXTURES = ["tiny", "small_shared", "tiny_stress"]


@pytest.mark.parametrize("name", FIXTURES)
def test_encoder_features_and_tokens_match_reference(name):
    arrays, _, cfg, out = reference_outputs(name)
    np.testing.assert_allclose(out["enc"], nhwc(arrays["vae_enc_out"]), atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(out["f"], nhwc(arrays["vae_f"]), atol=FEATURE_ATOL, rtol=0)
    for k in range(cfg.num_scales):
        np.testing.assert_array_equal(out["tokens"][k], arrays[f"vae_idx_{k}"], err_msg=f"scale {k}")
        assert out["tokens"][k].dtype == np.int32
        np.testing.assert_allclose(out["f_hats"][k], nhwc(arrays[f"vae_fhat_{k}"]), atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(out["tokens_to_fhat"], out["f_hats"][-1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_decoded_images_match_reference(name):
    arrays, _, _, out = reference_outputs(name)
    np.testing.assert_allclose(out["per_scale"][-1], nhwc(arrays["vae_rec_img"]), atol=IMAGE_ATOL, rtol=0)
    np.testing.assert_allclose(out["per_scale"], nhwc(arrays["vae_rec_img_per_scale"]), atol=IMAGE_ATOL, rtol=0)
    assert out["per_scale"].min() >= -1 and out["per_scale"].max() <= 1


@pytest.mark.parametrize("name", FIXTURES)
def test_teacher_forcing_input_matches_reference(name):
    arrays, _, _, out = reference_outputs(name)
    np.testing.assert_allclose(out["teacher"], arrays["var_x_BLCv_wo_first_l"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_next_scale_input_replays_recorded_sampling(name):
    arrays, _, _, out = reference_outputs(name)
    np.testing.assert_allclose(out["ar_fhats"], nhwc(arrays["ar_fhat_per_scale"]), atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose((out["ar_img"] + 1) / 2, nhwc(arrays["ar_img"]), atol=IMAGE_ATOL, rtol=0)


def test_tiny_stress_tokenizer_is_tiny_tokenizer():
    """tiny_stress only re-draws the VAR weights: its tokenizer part must be tiny's, bit for bit."""
    tiny, _ = load_fixture("tiny")
    stress, _ = load_fixture("tiny_stress")
    keys = [k for k in tiny if k.startswith(("vae/", "vae_", "var_x_"))]
    assert len(keys) > 300
    for k in keys:
        np.testing.assert_array_equal(tiny[k], stress[k], err_msg=k)


# ---- the Phi table and the Phi variants --------------------------------------------------------------------

def test_phi_index_table_reference_values():
    assert Q.phi_index_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert Q.phi_index_table(14, 4) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
    assert Q.phi_index_table(6, 1) == (0,) * 6
    assert Q.phi_index_table(5, 0) == (0, 1, 2, 3, 4)
    for name in ("tiny", "small_shared"):
        _, config = load_fixture(name)
        assert Q.phi_index_table(len(config["patch_nums"]), 4) == tuple(config["phi_idx_per_scale"])


def test_phi_ties_need_float64():
    """SN=10 has exact ties: the same arithmetic in float32 picks other convs (why the table is float64)."""
    k, sn = 4, 10
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k).astype(np.float32)
    table32 = tuple(int(np.argmin(np.abs(ticks - np.float32(si / (sn - 1))))) for si in range(sn))
    assert table32 != Q.phi_index_table(sn, k)


@pytest.mark.parametrize("share,quant_resi", [(4, 0.5), (1, 0.5), (0, -0.3), (2, 0.7), (4, 0.0)])
def test_apply_phi_uses_the_tabled_conv(share, quant_resi):
    """Known answer: conv k = (k+2)·identity (centre tap), bias k = k, so Phi_si(h) = (1-r)h + r((k+2)h + k)."""
    cfg = TokenizerConfig(vocab_size=8, z_channels=3, ch=32, ch_mult=(1, 1), patch_nums=(1, 2, 3, 4, 5),
                          share_quant_resi=share, quant_resi=quant_resi)
    k = cfg.num_phi
    kernels = np.zeros((k, 3, 3, 3, 3), np.float32)
    for i in range(k):
        kernels[i, 1, 1] = (i + 2) * np.eye(3)
    qp = {"codebook": np.zeros((8, 3), np.float32), "phi_kernels": kernels,
          "phi_biases": np.arange(k, dtype=np.float32)[:, None].repeat(3, 1)}
    h = np.random.default_rng().normal(size=(2, 4, 4, 3)).astype(np.float32)
    r = abs(quant_resi)
    for si in range(cfg.num_scales):
        got = np.asarray(Q.apply_phi(qp, cfg, si, h))
        if k == 0:
            np.testing.assert_array_equal(got, h)
            continue
        j = Q.phi_index_table(cfg.num_scales, share)[si]
        np.testing.assert_allclose(got, (1 - r) * h + r * ((j + 2) * h + j), atol=1e-5, rtol=0)


# ---- the quantizer recursion against a float64 reference --------------------------------------------------

def _cubic_weights(t, a=-0.75):
    def w(x):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def bicubic_matrix64(n_in, n_out):
    """PyTorch bicubic (align_corners=False, A=-0.75, clamped borders) as an (out, in) float64 matrix."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = int(np.floor(src))
        for tap, wt in zip(range(i0 - 1, i0 + 3), _cubic_weights(src - i0)):
            m[i, min(max(tap, 0), n_in - 1)] += wt
    return m


def phi64(qp, cfg, si, h):
    if cfg.phi_is_identity:
        return h
    j = Q.phi_index_table(cfg.num_scales, cfg.share_quant_resi)[si]
    kernel, bias = qp["phi_kernels"][j].astype(np.float64), qp["phi_biases"][j].astype(np.float64)
    padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    s = h.shape[1]
    conv = sum(padded[:, dy:dy + s, dx:dx + s] @ kernel[dy, dx] for dy in range(3) for dx in range(3)) + bias
    r = abs(cfg.quant_resi)
    return (1 - r) * h + r * conv


@pytest.mark.parametrize("patch_nums,share,quant_resi,znorm", [
    ((1, 3, 5, 7), 4, 0.5, False), ((2, 4, 6), 0, 0.5, False), ((1, 2, 5), 1, -0.4, False),
    ((1, 2, 3, 4), 4, 0.0, False), ((1, 4, 6), 3, 0.5, True)])
def test_quantizer_matches_float64_reference(patch_nums, share, quant_resi, znorm):
    rng = np.random.default_rng()
    cfg = TokenizerConfig(vocab_size=48, z_channels=6, ch=32, ch_mult=(1, 1), patch_nums=patch_nums,
                          share_quant_resi=share, quant_resi=quant_resi, using_znorm=znorm).validate()
    k, c, s = cfg.num_phi, cfg.z_channels, cfg.latent_size
    qp = {"codebook": rng.normal(size=(48, c)).astype(np.float32) * 0.5,
          "phi_kernels": rng.uniform(-0.3, 0.3, size=(k, 3, 3, c, c)).astype(np.float32),
          "phi_biases": rng.uniform(-0.1, 0.1, size=(k, c)).astype(np.float32)}
    f = rng.normal(size=(3, s, s, c)).astype(np.float32)
    tokens, f_hats = jax.jit(Q.f_to_tokens, static_argnums=2)(qp, f, cfg)

    e = qp["codebook"].astype(np.float64)
    f_rest, f_hat = f.astype(np.float64), np.zeros(f.shape)
    for si, pn in enumerate(patch_nums):
        z = area_loop(f_rest, pn, pn).reshape(-1, c)
        if znorm:
            score = -(z / np.linalg.norm(z, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
        else:
            score = ((z[:, None, :] - e[None]) ** 2).sum(-1)
        ours = np.asarray(tokens[si]).reshape(-1)
        # our code is the best one up to float32 rounding of the distances
        np.testing.assert_array_less(score[np.arange(len(ours)), ours], score.min(axis=1) + 1e-5)
        h = e[ours].reshape(-1, pn, pn, c)
        if si != cfg.num_scales - 1:
            b = bicubic_matrix64(pn, s)
            h = np.einsum("oh,pw,bhwc->bopc", b, b, h)
        h = phi64(qp, cfg, si, h)
        f_hat, f_rest = f_hat + h, f_rest - h
        np.testing.assert_allclose(np.asarray(f_hats[si]), f_hat, atol=2e-5, rtol=0, err_msg=f"scale {si}")

    # the other entry points follow the same recursion
    np.testing.assert_allclose(np.asarray(Q.tokens_to_fhat(qp, tokens, cfg)), f_hat, atol=2e-5, rtol=0)
    teacher = np.asarray(Q.teacher_forcing_input(qp, tokens, cfg))
    want = np.concatenate([area_loop(np.asarray(f_hats[si], np.float64), pn, pn).reshape(3, pn * pn, c)
                           for si, pn in enumerate(patch_nums[1:])], axis=1)
    np.testing.assert_allclose(teacher, want, atol=2e-5, rtol=0)
    assert teacher.shape == (3, cfg.seq_len - patch_nums[0] ** 2, c)


def test_quantize_for_training_values_and_gradients():
    rng = np.random.default_rng()
    cfg = TokenizerConfig(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=(1, 2, 4), beta=0.25)
    qp = {"codebook": rng.normal(size=(32, 4)).astype(np.float32),
          "phi_kernels": rng.uniform(-0.3, 0.3, size=(4, 3, 3, 4, 4)).astype(np.float32),
          "phi_biases": np.zeros((4, 4), np.float32)}
    f = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    tokens, f_hats = jax.jit(Q.f_to_tokens, static_argnums=2)(qp, f, cfg)
    f_hat_st, loss, train_tokens, hits = jax.jit(Q.quantize_for_training, static_argnums=2)(qp, f, cfg)

    np.testing.assert_allclose(np.asarray(f_hat_st), np.asarray(f_hats[-1]), atol=1e-6)
    want_loss = np.mean([(1 + cfg.beta) * np.mean((np.asarray(fh) - f) ** 2) for fh in f_hats])
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    for a, b in zip(train_tokens, tokens):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hits.shape == (3, 32)
    np.testing.assert_array_equal(np.asarray(hits).sum(1), [2 * pn * pn for pn in cfg.patch_nums])

    def objective(qp, f, g):
        f_st, loss, _, _ = Q.quantize_for_training(qp, f, cfg)
        return jnp.sum(f_st * g) + loss
    g = rng.normal(size=f.shape).astype(np.float32)
    grad_qp, grad_f = jax.jit(jax.grad(objective, argnums=(0, 1)))(qp, f, g)
    # straight-through g, plus the commitment term beta·mse(sg(f_hat), f) averaged over scales
    n = f.size
    want_f = g + np.mean([cfg.beta * 2 * (f - np.asarray(fh)) / n for fh in f_hats], axis=0)
    np.testing.assert_allclose(np.asarray(grad_f), want_f, atol=1e-6)
    used = np.unique(np.concatenate([np.asarray(t).reshape(-1) for t in tokens]))
    unused = np.setdiff1d(np.arange(32), used)
    assert np.abs(np.asarray(grad_qp["codebook"])[used]).sum() > 0
    np.testing.assert_array_equal(np.asarray(grad_qp["codebook"])[unused], 0)
    assert np.abs(np.asarray(grad_qp["phi_kernels"])).sum() > 0


def test_usage_ema_and_percent():
    hits = jnp.asarray([[4.0, 0.0], [1.0, 3.0]])
    ema = Q.update_usage_ema(jnp.full((2, 2), 7.0), hits, 0)
    np.testing.assert_allclose(ema, hits)                       # first update copies
    ema = Q.update_usage_ema(ema, jnp.zeros((2, 2)), 5)
    np.testing.assert_allclose(ema, 0.9 * hits)
    ema = Q.update_usage_ema(ema, jnp.ones((2, 2)), 100)
    np.testing.assert_allclose(ema, 0.99 * 0.9 * hits + 0.01, rtol=1e-6)
    # margin = 50 cells / 2 codes · 0.08 = 2
    np.testing.assert_allclose(Q.code_usage_percent(jnp.asarray([[2.0, 1.9], [3.0, 5.0]]), 50), [50.0, 100.0])


# ---- shape checks and configs -------------------------------------------------------------------------------

def test_bad_shapes_name_the_problem():
    cfg = TokenizerConfig(vocab_size=8, z_channels=4, ch=32, ch_mult=(1, 1), patch_nums=(1, 2, 4))
    qp = {"codebook": np.zeros((8, 4), np.float32), "phi_kernels": np.zeros((4, 3, 3, 4, 4), np.float32),
          "phi_biases": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 4\)"):
        Q.f_to_tokens(qp, np.zeros((1, 5, 5, 4), np.float32), cfg)
    with pytest.raises(ValueError, match=r"tokens\[1\].*\(B, 4\)"):
        Q.tokens_to_fhat(qp, [np.zeros((1, 1), np.int32), np.zeros((1, 3), np.int32),
                              np.zeros((1, 16), np.int32)], cfg)
    model = nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode(jnp.zeros((1, 8, 8, 4)))


def test_config_derived_values_serialisation_and_validation():
    cfg = TokenizerConfig()
    assert (cfg.downsample, cfg.latent_size, cfg.image_size, cfg.seq_len, cfg.num_scales) == (16, 16, 256, 680, 10)
    assert TokenizerConfig(patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)).seq_len == 2240
    again = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg) and isinstance(again.patch_nums, tuple)
    cfg.validate(image_size=256)
    bad = {"patch_nums": (1, 3, 2, 16), "ch": 48, "attn_levels": (7,), "quant_conv_ks": 2, "vocab_size": 0}
    for field, value in bad.items():
        with pytest.raises(ValueError, match=f"TokenizerConfig.{field}"):
            dataclasses.replace(cfg, **{field: value}).validate()
    with pytest.raises(ValueError, match="patch_nums.*512"):
        cfg.validate(image_size=512)
    with pytest.raises(ValueError, match="unknown field"):
        TokenizerConfig.from_dict({"vocab": 3})


def test_released_shape_parameter_count():
    """The released tokenizer has 108,948,355 parameters (VAR_REFERENCE.md §1)."""
    model = nnx.eval_shape(lambda: VQVAE(TokenizerConfig(), rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 108_948_355


def test_init_is_sensible_for_training_from_scratch():
    # one level keeps the compile short; the per-layer init does not depend on depth
    cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1,), num_res_blocks=1, patch_nums=(1, 2, 4, 8))

    @jax.jit
    def init_and_encode(key):
        model = VQVAE(cfg, rngs=nnx.Rngs(key))
        img = jax.random.uniform(jax.random.fold_in(key, 1), (4, 8, 8, 3), minval=-1, maxval=1)
        f = model.encode(img)
        return f, Q.f_to_tokens(model.quantizer_params(), f, cfg)[0], model.codebook[...]

    f, tokens, codebook = init_and_encode(jax.random.key(np.random.default_rng().integers(1 << 30)))
    assert np.isfinite(np.asarray(f)).all() and 0.05 < float(jnp.std(f)) < 5
    assert 0.03 < float(jnp.std(codebook)) < 0.07
    assert len(np.unique(np.asarray(tokens[-1]))) > 4          # codes are not collapsed at init


# ---- batch sharded over simulated devices --------------------------------------------------------------------

def test_sharded_tokens_equal_unsharded_and_reference():
    code = r"""
import json, numpy as np, jax, jax.numpy as jnp
from flax import nnx
import var_jax
from conftest import load_fixture, state_dict
from var_jax.sharding import make_mesh, state_shardings, batch_sharding
from var_jax.tokenizer.convert import vqvae_from_state_dict
from var_jax.tokenizer.quantizer import f_to_tokens

arrays, config = load_fixture("tiny")
cfg, model = vqvae_from_state_dict(state_dict(arrays, "vae"), patch_nums=tuple(config["patch_nums"]))
graphdef, params = nnx.split(model)
f = np.tile(arrays["vae_f"].transpose(0, 2, 3, 1), (4, 1, 1, 1))   # 8 rows: the recorded pair, 4 times

def run(params, f):
    m = nnx.merge(graphdef, params)
    return f_to_tokens(m.quantizer_params(), f, m.cfg)

step = jax.jit(run)  # graphdef is closed over
base = jax.tree.map(np.asarray, step(params, f))
for shape in [(8, 1, 1), (2, 2, 2)]:
    mesh = make_mesh(shape)
    sharded_params = jax.device_put(params, state_shardings(params, mesh))
    x = jax.device_put(f, batch_sharding(mesh, 4))
    with jax.set_mesh(mesh):
        tokens, f_hats = step(sharded_params, x)
    assert len(tokens[0].sharding.device_set) == 8
    for k in range(cfg.num_scales):
        np.testing.assert_array_equal(np.asarray(tokens[k]), base[0][k])
        np.testing.assert_array_equal(np.asarray(tokens[k]), np.tile(arrays[f"vae_idx_{k}"], (4, 1)))
        np.testing.assert_allclose(np.asarray(f_hats[k]), base[1][k], atol=1e-6, rtol=0)
    print("ok", shape)
"""
    out = run_with_devices(code, 8)
    assert "ok (8, 1, 1)" in out and "ok (2, 2, 2)" in out


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (1, 5, 7, 96)])
def test_group_norm_matches_float64_reference_and_flax(shape):
    """The channel-sum GroupNorm equals the two-pass float64 GroupNorm (PyTorch's) and flax's own, with random
    scale and bias and a large mean (the case E[x^2]-mean^2 would get wrong)."""
    from var_jax.tokenizer.vqvae import group_norm
    channels, rng = shape[-1], np.random.default_rng()
    norm = group_norm(channels, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(rng.normal(size=channels), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(size=channels), jnp.float32)
    x = (rng.normal(size=shape) * 3 + 50).astype(np.float32)
    groups = x.astype(np.float64).reshape(shape[0], -1, 32, channels // 32)
    mean = groups.mean(axis=(1, 3), keepdims=True)
    reference = ((groups - mean) / np.sqrt(((groups - mean) ** 2).mean(axis=(1, 3), keepdims=True) + 1e-6))
    reference = reference.reshape(shape) * np.float64(norm.scale[...]) + np.float64(norm.bias[...])
    ours = np.asarray(norm(jnp.asarray(x)))
    np.testing.assert_allclose(ours, reference, atol=3e-5, rtol=0)      # observed ≤ 1e-5 over 80 draws
    # flax's own float32 error on this input reaches ~2.2e-5, so the two differ by up to the sum of both
    np.testing.assert_allclose(ours, np.asarray(nnx.GroupNorm.__call__(norm, jnp.asarray(x))), atol=5e-5, rtol=0)


def test_split_for_decoding_drops_the_encoder_and_decodes_the_same():
    arrays, _ = load_fixture("tiny")
    _, model = vqvae_from_state_dict(state_dict(arrays, "vae"))
    full_graphdef, full_state = nnx.split(model)
    graphdef, state, spec = split_for_decoding(model)
    paths = [path for path, _ in nnx.to_flat_state(state)]
    assert paths and not any(p[0] in ("encoder", "quant_conv") for p in paths)
    assert {p[0] for p, _, _ in spec} == {"encoder", "quant_conv"}
    hash(spec)   # a jit static argument / cache key
    f_hat = jax.random.normal(jax.random.key(3), (2, model.cfg.latent_size, model.cfg.latent_size,
                                                  model.cfg.z_channels))
    decoded = jax.jit(lambda s, f: merge_for_decoding(graphdef, s, spec).decode(f))(state, f_hat)
    want = jax.jit(lambda s, f: nnx.merge(full_graphdef, s).decode(f))(full_state, f_hat)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(want))
    with pytest.raises(TypeError):   # the encoder's parameters are shapes only
        jax.jit(lambda s, x: merge_for_decoding(graphdef, s, spec).encode(x))(
            state, jnp.zeros((1, model.cfg.image_size, model.cfg.image_size, 3)))
