"""The BSQ tokenizer (var_jax/tokenizer/bsq.py, quantizer='bsq') against a float64 numpy transcription of Infinity's
MultiScaleBSQ / BSQ formulas on random features: tokens bit for bit, features and losses within 1e-5; its config
checks, the VQ path left as it was, and the converter's refusal."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax.tokenizer import bsq, quantizer
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE, image_to_tokens, tokens_to_image

# non-integer area / bilinear ratios (5 -> 3, 5 -> 2) and a last scale at the latent size
PATCH_NUMS = (1, 2, 3, 5)
BITS = 7


def bsq_config(bits=BITS, patch_nums=PATCH_NUMS, **kw):
    return TokenizerConfig(quantizer="bsq", bits=bits, vocab_size=-1, z_channels=-1, ch=32, ch_mult=(1, 1),
                           num_res_blocks=1, patch_nums=patch_nums, **kw).validate()


# ---- float64 numpy transcription of Infinity (PyTorch's interpolation kernels written out per pixel) -----------

def np_area(x, out):
    """F.interpolate(mode='area') = adaptive_avg_pool2d on NHWC."""
    _, h, w, _ = x.shape
    y = np.zeros((x.shape[0], out, out, x.shape[3]))
    for i in range(out):
        for j in range(out):
            rows = slice((i * h) // out, -((-(i + 1) * h) // out))
            cols = slice((j * w) // out, -((-(j + 1) * w) // out))
            y[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
    return y


def np_bilinear(x, out):
    """upsample_bilinear2d with align_corners=False, as PyTorch's CPU kernel computes its taps."""
    _, h, w, _ = x.shape

    def taps(in_size, i):
        src = max((i + 0.5) * in_size / out - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + (1 if i0 < in_size - 1 else 0)
        return i0, i1, 1.0 - (src - i0), src - i0

    y = np.zeros((x.shape[0], out, out, x.shape[3]))
    for i in range(out):
        h0, h1, a0, a1 = taps(h, i)
        for j in range(out):
            w0, w1, b0, b1 = taps(w, j)
            y[:, i, j] = (a0 * (b0 * x[:, h0, w0] + b1 * x[:, h0, w1]) + a1 * (b0 * x[:, h1, w0] + b1 * x[:, h1, w1]))
    return y


def np_l2norm(z):
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def np_lfq(z):
    """BSQ.forward (new_quant): (unit-sphere features, code, bits)."""
    zn = np_l2norm(z)
    code = np.where(zn > 0, 1.0, -1.0) / math.sqrt(z.shape[-1])
    return zn, code, (code > 0).astype(np.int64)


def np_entropy_loss(zn, inv_temperature, entropy_weight, commitment_weight, code):
    d = zn.shape[-1]
    p = 1.0 / (1.0 + np.exp(4 * zn / math.sqrt(d) * inv_temperature))       # sigmoid(-4 z / sqrt(d) / T)
    prob = np.stack([p, 1 - p], axis=-1)
    entropy = lambda q: -(q * np.log(q + 1e-8)).sum(-1)
    per_sample = entropy(prob).sum(-1).mean()
    codebook = entropy(prob.reshape(-1, d, 2).mean(0)).sum()
    commit = ((zn - code) ** 2).mean()
    return commit * commitment_weight + (1.0 * (per_sample - codebook) / inv_temperature) * entropy_weight


def np_ids(bits):
    d = bits.shape[-1]
    return (bits * (2 ** np.arange(d - 1, -1, -1))).sum(-1)


def np_multiscale_bsq(f, patch_nums, beta=0.25, entropy_weight=0.1, inv_temperature=100.0):
    """MultiScaleBSQ.forward: (per-scale ids (B, pn²), f_hat after each scale, mean of the per-scale losses)."""
    latent = f.shape[1]
    residual, f_hat = f.copy(), np.zeros_like(f)
    ids, f_hats, losses = [], [], []
    for pn in patch_nums:
        z = residual if pn == latent else np_area(residual, pn)
        zn, code, bits = np_lfq(z)
        losses.append(np_entropy_loss(zn, inv_temperature, entropy_weight, beta, code))
        up = code if pn == latent else np_bilinear(code, latent)
        residual, f_hat = residual - up, f_hat + up
        ids.append(np_ids(bits).reshape(f.shape[0], -1))
        f_hats.append(f_hat.copy())
    return ids, f_hats, float(np.mean(losses))


def np_next_inputs(ids, patch_nums, bits, latent, resize):
    """Infinity's next-scale inputs from bit labels: summed codes (bilinear up), then `resize` to the next side."""
    cum, inputs = np.zeros((ids[0].shape[0], latent, latent, bits)), []
    for si, pn in enumerate(patch_nums[:-1]):
        b = (ids[si][..., None] >> np.arange(bits - 1, -1, -1)) & 1
        code = np_l2norm((b * 2 - 1).astype(np.float64)).reshape(-1, pn, pn, bits)  # indices_to_codes
        cum = cum + (code if pn == latent else np_bilinear(code, latent))
        nxt = (np_bilinear if resize == "bilinear" else np_area)(cum, patch_nums[si + 1])
        inputs.append(nxt.reshape(nxt.shape[0], -1, bits))
    return np.concatenate(inputs, axis=1)


def random_features(seed, batch=3, latent=PATCH_NUMS[-1], bits=BITS):
    return np.random.default_rng(seed).normal(size=(batch, latent, latent, bits)).astype(np.float32)


# ---- the quantizer against the transcription ---------------------------------------------------------------------

def test_resampling_matches_pytorch_kernels():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3))
    for out in (1, 2, 3, 5, 8, 13):
        np.testing.assert_allclose(bsq.bilinear_resize(jnp.asarray(x, jnp.float32), out), np_bilinear(x, out),
                                   atol=1e-5, err_msg=f"5 -> {out}")


@pytest.mark.parametrize("seed", [0, 1])
def test_tokens_features_and_loss_equal_the_float64_transcription(seed):
    cfg = bsq_config(beta=0.3, entropy_weight=0.2, inv_temperature=50.0)
    f = random_features(seed)
    ids, f_hats, loss = np_multiscale_bsq(f.astype(np.float64), PATCH_NUMS, 0.3, 0.2, 50.0)
    tokens, got_f_hats = jax.jit(lambda x: quantizer.f_to_tokens({}, x, cfg))(f)
    for si in range(len(PATCH_NUMS)):
        np.testing.assert_array_equal(tokens[si], ids[si], err_msg=f"scale {si}")
        np.testing.assert_allclose(got_f_hats[si], f_hats[si], atol=1e-5, err_msg=f"scale {si}")
    f_hat, got_loss, train_tokens, ones = jax.jit(lambda x: quantizer.quantize_for_training({}, x, cfg))(f)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f_hat, f_hats[-1], atol=1e-5)
    for si, pn in enumerate(PATCH_NUMS):
        np.testing.assert_array_equal(train_tokens[si], ids[si])
        bits = (ids[si][..., None] >> np.arange(BITS - 1, -1, -1)) & 1
        np.testing.assert_array_equal(ones[si], bits.reshape(-1, BITS).sum(0))
    # decoding the tokens gives the encoder's f_hat (up to float32 summation order, eager here, jitted there)
    np.testing.assert_allclose(quantizer.tokens_to_fhat({}, tokens, cfg), got_f_hats[-1], atol=1e-6)


@pytest.mark.parametrize("resize", ["bilinear", "area"])
def test_teacher_forcing_input_equals_the_transcription(resize):
    cfg = bsq_config()
    ids, _, _ = np_multiscale_bsq(random_features(2).astype(np.float64), PATCH_NUMS)
    tokens = [jnp.asarray(t, jnp.int32) for t in ids]
    got = quantizer.teacher_forcing_input({}, tokens, cfg, resize)
    np.testing.assert_allclose(got, np_next_inputs(ids, PATCH_NUMS, BITS, PATCH_NUMS[-1], resize), atol=1e-5)
    if resize == "bilinear":   # Infinity's is the BSQ default
        np.testing.assert_array_equal(quantizer.teacher_forcing_input({}, tokens, cfg), got)


def test_straight_through_gradient_and_bit_packing():
    z = jnp.asarray(np.random.default_rng(3).normal(size=(4, BITS)), jnp.float32)
    codes, bits, z_hat = bsq.quantize(z)
    # the forward value is the code itself, ±1/sqrt(d), not z_hat + (code - z_hat) rounded
    np.testing.assert_array_equal(codes, np.where(np.asarray(z) > 0, 1, -1) * np.float32(1 / math.sqrt(BITS)))
    # the gradient of the codes is that of the normalisation
    np.testing.assert_allclose(jax.jacobian(lambda x: bsq.quantize(x)[0])(z), jax.jacobian(bsq.l2_normalise)(z),
                               atol=1e-6)
    ids = np.random.default_rng(4).integers(0, 2 ** 31 - 1, size=50)
    np.testing.assert_array_equal(bsq.ids_to_bits(ids, 31), [[int(c) for c in np.binary_repr(i, 31)] for i in ids])
    np.testing.assert_array_equal(bsq.bits_to_ids(bsq.ids_to_bits(ids, 31)), ids)


def test_per_bit_usage():
    ones = jnp.asarray([[1.0, 50.0, 99.0, 3.0], [4.0, 4.0, 96.0, 96.0]])
    # rarer value >= 4 % of the 100 positions counts as used
    np.testing.assert_allclose(bsq.bit_usage_percent(ones, [100, 100]), [25.0, 100.0])


def test_model_images_tokens_and_no_learned_quantizer():
    cfg = bsq_config(bits=5, patch_nums=(1, 2, 4))
    model = VQVAE(cfg, rngs=nnx.Rngs(0))
    names = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not names & {"codebook", "phi_kernels", "phi_biases"} and model.quantizer_params() == {}
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    tokens = image_to_tokens(model, images)
    assert [t.shape for t in tokens] == [(2, 1), (2, 4), (2, 16)] and all(t.dtype == jnp.int32 for t in tokens)
    assert all(int(t.max()) < 2 ** 5 for t in tokens)
    assert tokens_to_image(model, tokens).shape == (2, 8, 8, 3)


# ---- configuration -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    (dict(quantizer="bsq", bits=0), r"bits: must be an integer in \[1, 31\]"),
    (dict(quantizer="bsq", bits=40), r"bits: must be an integer in \[1, 31\]"),
    (dict(quantizer="bsq", bits=6, z_channels=8, vocab_size=-1), r"z_channels: must equal bits=6"),
    (dict(quantizer="bsq", bits=6, z_channels=-1, vocab_size=4096), r"vocab_size: must be 2\*\*bits = 64"),
    (dict(quantizer="bsq", bits=6, z_channels=-1, vocab_size=-1, inv_temperature=0.0), r"inv_temperature"),
    (dict(bits=6), r"bits: is read only with quantizer='bsq'"),
    (dict(quantizer="fsq"), r"quantizer: must be one of \('vq', 'bsq'\)"),
])
def test_bad_quantizer_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=r"^TokenizerConfig\." + message):
        TokenizerConfig(**fields).validate()


def test_vq_config_reads_as_before_and_bsq_round_trips():
    assert not {"quantizer", "bits", "entropy_weight", "inv_temperature"} & set(TokenizerConfig().to_dict())
    cfg = bsq_config(entropy_weight=0.05)
    assert cfg.to_dict()["quantizer"] == "bsq" and TokenizerConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.vocab_size, cfg.z_channels, cfg.num_phi) == (2 ** BITS, BITS, 0)


def test_converter_refuses_bsq():
    from var_jax.tokenizer.convert import vqvae_to_state_dict
    model = nnx.eval_shape(lambda: VQVAE(bsq_config(bits=4, patch_nums=(1, 2)), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"^quantizer='bsq' has no reference checkpoint layout"):
        vqvae_to_state_dict(model)
