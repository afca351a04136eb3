"""Infinity's bitwise head and bitwise self-correction: the head loss and the self-correction walk against float64
numpy transcriptions of Infinity's trainer, p = 0 as exact teacher forcing, the mean flip rate p/2, a bitwise model's
cached sampling against its teacher-forced logits (every sampling mode, editing), and the config checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import repo_config
from test_bsq import BITS, PATCH_NUMS, bsq_config, np_area, np_bilinear, np_ids, np_l2norm, random_features

from var_jax.checkpoints import ModelBundle
from var_jax.sample.edit import edit
from var_jax.sample.sampler import SampleOptions, make_sample_fn
from var_jax.tokenizer import bsq, quantizer
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.train import trainer
from var_jax.train.stage import ConfigError
from var_jax.train.var import loss as var_loss
from var_jax.train.var.self_correction import flip_rates, rate_steps, self_corrected_tokens
from var_jax.transformer import VAR, VARConfig
from var_jax.transformer.bitwise_head import bitwise_cross_entropy


# ---- the head loss ----------------------------------------------------------------------------------------------

def np_bitwise_loss(logits, ids, bits, smoothing):
    """Infinity's trainer: CrossEntropyLoss(label_smoothing) over (B, 2, L, d) bit logits, mean over the bits."""
    pairs = logits.reshape(*logits.shape[:-1], bits, 2).astype(np.float64)
    log_p = pairs - np.log(np.exp(pairs).sum(-1, keepdims=True))
    targets = (ids[..., None] >> np.arange(bits - 1, -1, -1)) & 1
    q = (1 - smoothing) * np.eye(2)[targets] + smoothing / 2
    return -(q * log_p).sum(-1).mean(-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_head_loss_equals_the_float64_transcription(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(3, 11, 2 * BITS)).astype(np.float32)
    ids = rng.integers(0, 2 ** BITS, size=(3, 11))
    got = bitwise_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), BITS, smoothing)
    np.testing.assert_allclose(got, np_bitwise_loss(logits, ids, BITS, smoothing), rtol=1e-5, atol=1e-6)
    # the per-token weighting is the index head's: a weighted sum over tokens, mean over the batch
    np.testing.assert_array_equal(var_loss.head_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), smoothing,
                                                              BITS), got)


# ---- self-correction ----------------------------------------------------------------------------------------------

def drawn_flips(key, p, batch):
    """The flip masks self_corrected_tokens draws for `key` (the draw itself; the walk is what is checked)."""
    rate_key, flip_key = jax.random.split(key)
    rates = np.asarray(flip_rates(rate_key, p, len(PATCH_NUMS)))
    return [np.asarray(jax.random.uniform(jax.random.fold_in(flip_key, si), (batch, pn, pn, BITS)) < rates[si])
            for si, pn in enumerate(PATCH_NUMS)]


def np_flip_requant(f, masks):
    """BitwiseSelfCorrection.flip_requant (noise_apply_requant=1, every scale): (gt ids, x_BLC_wo_prefix)."""
    latent, last = f.shape[1], len(PATCH_NUMS) - 1
    cum, targets, inputs = np.zeros_like(f), [], []
    scale = 1 / np.sqrt(BITS)
    for si, pn in enumerate(PATCH_NUMS):
        residual = f - cum
        if si != last:
            residual = np_area(residual, pn)
        bits = (np_l2norm(residual) > 0).astype(np.int64)
        targets.append(np_ids(bits).reshape(f.shape[0], -1))
        pred = np.where(masks[si], 1 - bits, bits)
        quantized = np_l2norm(pred * scale * 2 - scale)              # indices_to_codes(bit_label)
        cum = cum + (quantized if pn == latent else np_bilinear(quantized, latent))
        if si < last:
            nxt = np_bilinear(cum, PATCH_NUMS[si + 1])
            inputs.append(nxt.reshape(f.shape[0], -1, BITS))
    return targets, np.concatenate(inputs, axis=1)


def test_self_correction_equals_the_float64_transcription():
    cfg, f, key = bsq_config(), random_features(5), jax.random.key(3)
    masks = drawn_flips(key, 0.3, f.shape[0])
    assert 0 < np.mean([m.mean() for m in masks]) < 0.3
    targets, history = jax.jit(lambda x: self_corrected_tokens(x, cfg, 0.3, key))(f)
    want_targets, want_inputs = np_flip_requant(f.astype(np.float64), masks)
    for si in range(len(PATCH_NUMS)):
        np.testing.assert_array_equal(targets[si], want_targets[si], err_msg=f"scale {si}")
    np.testing.assert_allclose(quantizer.teacher_forcing_input({}, history, cfg), want_inputs, atol=1e-5)


def test_p0_is_exactly_teacher_forcing():
    cfg, f = bsq_config(), jnp.asarray(random_features(6))
    tokens, _ = quantizer.f_to_tokens({}, f, cfg)
    targets, history = self_corrected_tokens(f, cfg, 0.0, jax.random.key(0))
    for t, target, seen in zip(tokens, targets, history):
        np.testing.assert_array_equal(target, t)
        np.testing.assert_array_equal(seen, t)


def test_mean_flip_rate_is_half_of_p():
    p, steps = 0.3, 3000
    rates = np.asarray(jax.vmap(lambda k: flip_rates(k, p, 4))(jax.random.split(jax.random.key(1), steps)))
    assert set(np.round(rates.ravel() * 100).astype(int)) == set(range(31))   # uniform over {0, 0.01, ..., p}
    cfg, f = bsq_config(), jnp.asarray(random_features(7, batch=2))
    # at every scale the corrupted history differs from the targets exactly where a bit was flipped
    flipped = jax.jit(jax.vmap(lambda k: jnp.stack([
        jnp.mean((bsq.ids_to_bits(t, BITS) != bsq.ids_to_bits(h, BITS)).astype(jnp.float32))
        for t, h in zip(*self_corrected_tokens(f, cfg, p, k))])))(jax.random.split(jax.random.key(2), 1000))
    assert abs(float(jnp.mean(flipped)) - p / 2) < 0.01
    with pytest.raises(ValueError, match=r"loss\.bitwise_self_correction: must be in \[0, 1\] in steps of 0\.01"):
        rate_steps(0.125)


# ---- the model: cached sampling, modes, editing -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bitwise_bundle():
    tok_cfg = bsq_config(bits=6, patch_nums=(1, 2, 3, 4))
    var_cfg = VARConfig(depth=2, width=32, heads=2, num_classes=10, vocab_size=2 ** 6, z_channels=6,
                        patch_nums=(1, 2, 3, 4), head="bitwise", init_head=1.0, drop_path_rate=0.0)
    # built jitted: op-by-op initialisation takes tens of seconds on a busy CPU
    return ModelBundle(tok_cfg, nnx.jit(lambda: VQVAE(tok_cfg, rngs=nnx.Rngs(0)))(), var_cfg,
                       nnx.jit(lambda: VAR(var_cfg, rngs=nnx.Rngs(1)))())


def sample(options, labels, seed=7, **kw):
    bundle = bitwise_bundle()
    (vg, vs), (tg, ts) = nnx.split(bundle.var), nnx.split(bundle.tokenizer)
    return make_sample_fn(vg, tg, options, **kw)(vs, ts, labels, np.arange(len(labels)), seed)


def test_cached_sampling_equals_teacher_forced_logits():
    bundle, cfg, labels = bitwise_bundle(), 2.0, np.asarray([1, 4, 9])
    options = SampleOptions(cfg=cfg, cfg_schedule="constant", top_k=0, top_p=0.9, mode="unrolled")
    out = sample(options, labels, decode=False, with_logits=True)
    teacher = jax.jit(lambda t: quantizer.teacher_forcing_input({}, t, bundle.tokenizer_config,
                                                                bundle.var_config.input_resize))(out["tokens"])
    graphdef, state = nnx.split(bundle.var)
    forward = jax.jit(lambda y: nnx.merge(graphdef, state)(y, teacher))
    cond, uncond = forward(labels), forward(np.full_like(labels, bundle.var_config.num_classes))
    got = jnp.concatenate(out["logits"], axis=1)
    assert got.shape == (3, 30, 12)
    np.testing.assert_allclose(got, (1 + cfg) * cond - cfg * uncond, atol=1e-5, rtol=0)
    assert len({tuple(np.asarray(t).ravel()) for t in out["tokens"][-1]}) == 3   # the draws are not all the same
    # the bits drawn are those the per-bit draw gives for these logits (what the sampler drew is what it scored)
    from var_jax.sample.sampler import _choose, image_keys
    redraw = jax.jit(lambda lg, si: _choose(lg, image_keys(7, np.arange(3)), si, 0.0, None, options, 6)[0])
    for si, (tokens, logits) in enumerate(zip(out["tokens"], out["logits"])):
        np.testing.assert_array_equal(redraw(logits, si), tokens)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (1, 0.0), (2, 0.0), (0, 0.8), (1, 0.9), (0, 0.5), (5, 1.0)])
def test_per_bit_filter_is_the_samplers_filter_on_two_values(top_k, top_p):
    from var_jax.sample.bitwise import filter_pairs
    from var_jax.sample.filtering import filter_logits
    logits = np.random.default_rng(top_k).normal(scale=2.0, size=(4, 500, 2)).astype(np.float32)
    logits[:, :20, 1] = logits[:, :20, 0]                                        # ties
    np.testing.assert_array_equal(filter_pairs(jnp.asarray(logits), top_k, top_p),
                                  filter_logits(jnp.asarray(logits), top_k, top_p))


def test_scanned_and_unrolled_modes_draw_the_same_bits():
    labels = np.asarray([0, 3, 10])   # 10: the null class
    options = dict(cfg=1.5, top_k=0, top_p=0.8, more_smooth=True, waste_budget=0.5)   # soft codes: every draw used
    unrolled, scanned = (sample(SampleOptions(mode=mode, **options), labels, decode=False)
                         for mode in ("unrolled", "scanned"))
    for a, b in zip(scanned["tokens"], unrolled["tokens"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(scanned["f_hat"], unrolled["f_hat"], atol=1e-5)


def test_editing_keeps_the_source_tokens_outside_the_box():
    image = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    out = edit(bitwise_bundle(), image, box=(0.0, 0.0, 0.5, 0.5), mode="inpaint", label=2)
    for tokens, source, keep in zip(out["tokens"], out["source_tokens"], out["keep"]):
        np.testing.assert_array_equal(np.asarray(tokens)[0][keep.ravel()], source[0][keep.ravel()])
    assert out["image"].shape == (8, 8, 3)


# ---- configuration ------------------------------------------------------------------------------------------------

def test_var_config_checks_and_defaults():
    assert not {"head", "input_resize"} & set(VARConfig(depth=2).to_dict())
    cfg = VARConfig(depth=2, vocab_size=2 ** 8, z_channels=8, head="bitwise")
    assert (cfg.bits, cfg.head_size) == (8, 16) and VARConfig.from_dict(cfg.to_dict()) == cfg
    for fields, message in ((dict(head="bitwise"), r"head: 'bitwise' predicts the z_channels bits"),
                            (dict(head="binary"), r"head: must be one of"),
                            (dict(input_resize="nearest"), r"input_resize: must be one of"),
                            (dict(head="bitwise", vocab_size=16, z_channels=4, order="raster", patch_nums=(4,)),
                             r"head: 'bitwise' needs order='scale'")):
        with pytest.raises(ValueError, match=r"^VARConfig\." + message):
            VARConfig(depth=2, **fields)
    from var_jax.transformer.convert import var_to_state_dict
    with pytest.raises(ValueError, match=r"^head='bitwise' \(Infinity's bitwise head\) has no reference checkpoint"):
        var_to_state_dict(bitwise_bundle().var)


@pytest.fixture(scope="module")
def bsq_tokenizer_dir(tmp_path_factory):
    from var_jax.checkpoints import save_model_dir
    cfg = bsq_config(bits=6, patch_nums=(1, 2, 3, 4))
    path = tmp_path_factory.mktemp("bsq") / "model"
    save_model_dir(path, tokenizer=(cfg, VQVAE(cfg, rngs=nnx.Rngs(0))))
    return path


def var_config(tokenizer, image_size: int):
    cfg = repo_config(f"digits_var.py:depth=2,width=64,batch=8,steps=2,image_size={image_size}")
    cfg.tokenizer_checkpoint, cfg.patch_nums, cfg.sample_every = str(tokenizer), (1, 2, 3, 4), 0
    return cfg


@pytest.mark.parametrize("tokenizer,field,value,message", [
    ("vq", "model.head", "bitwise", r"model\.head: 'bitwise' predicts the bits of a BSQ tokenizer"),
    ("vq", "loss.bitwise_self_correction", 0.1, r"loss\.bitwise_self_correction: flips the bits of a BSQ"),
    ("bsq", "loss.bitwise_self_correction", 1.5, r"loss\.bitwise_self_correction: must be in \[0, 1\]"),
    ("bsq", "model.input_resize", "cubic", r"model\.input_resize: must be one of"),
])
def test_bad_bitwise_settings_are_named_before_compiling(tokenizer_dir, bsq_tokenizer_dir, tmp_path, monkeypatch,
                                                         tokenizer, field, value, message):
    # the conftest VQ tokenizer reads 16 px images, this BSQ one 8 px
    cfg = var_config(*((bsq_tokenizer_dir, 8) if tokenizer == "bsq" else (tokenizer_dir, 16)))
    cfg.model.head = "bitwise" if tokenizer == "bsq" else cfg.model.head
    cfg.loss.bitwise_self_correction = 0.1 if tokenizer == "bsq" else 0.0
    section, name = field.split(".")
    cfg[section][name] = value
    import var_jax.train.var.stage as var_stage
    monkeypatch.setattr(var_stage, "jit_train_step", lambda *a, **k: pytest.fail("compiled before the check"))
    with pytest.raises(ConfigError, match=message):
        trainer.train(cfg, tmp_path / "run")


def test_self_correction_needs_images_not_a_token_set(bsq_tokenizer_dir):
    from var_jax.train.var.stage import self_correction_from
    cfg = var_config(bsq_tokenizer_dir, 8)
    cfg.loss.bitwise_self_correction = 0.1
    with pytest.raises(ConfigError, match=r"^loss\.bitwise_self_correction: re-quantizes the encoder's features"):
        self_correction_from(cfg, bitwise_bundle().tokenizer_config, from_tokens=True)
    assert self_correction_from(cfg, bitwise_bundle().tokenizer_config, from_tokens=False) == 0.1


def test_bsq_tokenizer_stage_refuses_a_codebook_restart(tmp_path):
    cfg = repo_config("digits_tokenizer.py:steps=2,batch=8")
    cfg.tokenizer.quantizer, cfg.tokenizer.bits, cfg.loss.restart_every = "bsq", 8, 10
    with pytest.raises(ConfigError, match=r"restart_every re-draws dead codebook entries; the BSQ quantizer has no"):
        trainer.train(cfg, tmp_path / "run")
    cfg.loss.restart_every, cfg.tokenizer.bits = 0, 0
    with pytest.raises(ConfigError, match=r"tokenizer\.bits: must be an integer in \[1, 31\]"):
        trainer.train(cfg, tmp_path / "run")


def test_runs_recorded_before_the_bitwise_fields_still_resume(tmp_path):
    from resume_guard import check_resumes, record_run
    from var_jax.train.checkpointing import CheckpointMismatch, run_identity
    for spec, section, fields in (("digits_var.py", "model", ("head", "input_resize")),
                                  ("digits_tokenizer.py", "tokenizer", ("quantizer", "bits", "entropy_weight",
                                                                        "inv_temperature"))):
        config, old = repo_config(spec), tmp_path / spec
        old.mkdir()
        recorded = run_identity(config)
        for name in fields:
            del recorded[section][name]
        recorded["loss"].pop("bitwise_self_correction", None)
        record_run(old, recorded)
        check_resumes(old, config)
        config[section][fields[0]] = "bitwise" if section == "model" else "bsq"
        with pytest.raises(CheckpointMismatch, match=rf"{section}\.{fields[0]}: checkpoint has '(index|vq)'"):
            check_resumes(old, config)
