"""The multi-scale residual quantizer as pure functions (jit them with `cfg` static).

`qparams` is `VQVAE.quantizer_params()`: {"codebook": (V, C), "phi_kernels": (K, 3, 3, C, C), "phi_biases": (K, C)}.
Feature maps are NHWC at the latent size h = w = cfg.patch_nums[-1]; token maps are (B, pn²) int32, row-major.

The recursion (VAR_REFERENCE.md §1): for each scale si with side pn, quantize area(f_rest -> pn) to the nearest
codes, bring their embeddings back to full size (bicubic; not at the last scale), apply Phi_si, and add the result
to f_hat / subtract it from f_rest. Everything here runs in float32 whatever the caller's dtype.

With `cfg.quantizer == 'bsq'` (Infinity's binary spherical quantizer, bsq.py) the public functions here dispatch to
bsq.py: `qparams` is then empty (nothing is learned), tokens are the packed bits, "embeddings" are the ±1/√d codes,
and the usage statistics are per bit. The transformer's next-scale input may then be resized bilinearly
(Infinity) or by area (VAR): `resize` of next_scale_input / teacher_forcing_input, 'auto' = the quantizer's own.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.tokenizer import bsq
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.resize import area_resize, bicubic_resize

_HIGHEST = jax.lax.Precision.HIGHEST
# Code-usage EMA of the reference (logged only): decay 0.9 for the first 100 updates, then 0.99.
USAGE_EMA_WARMUP_UPDATES = 100
USAGE_EMA_DECAY_WARMUP, USAGE_EMA_DECAY = 0.9, 0.99
# A code counts as "used" when its EMA hit count reaches this fraction of a uniform share of the latent cells.
USAGE_MARGIN_FRACTION = 0.08


@functools.lru_cache(maxsize=None)
def phi_index_table(num_scales: int, share_quant_resi: int) -> tuple[int, ...]:
    """Which Phi conv each scale uses: argmin_k |ticks_k - si/(SN-1)|.

    ticks = linspace(1/(3K), 1-1/(3K), K) for K = 4, else linspace(1/(2K), 1-1/(2K), K); K = num_scales when
    share_quant_resi = 0. Computed in float64 like the reference: its ties (si/(SN-1) exactly between two
    ticks) resolve differently in float32. SN=10, K=4 -> (0,0,1,1,1,2,2,3,3,3).
    """
    k = num_scales if share_quant_resi == 0 else share_quant_resi
    if k < 1 or num_scales < 1:
        raise ValueError(f"phi_index_table: need num_scales >= 1 and a Phi count >= 1, got {num_scales}, {k}")
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    ticks = np.linspace(margin, 1 - margin, k, dtype=np.float64)
    positions = [si / (num_scales - 1) if num_scales > 1 else 0.0 for si in range(num_scales)]
    return tuple(int(np.argmin(np.abs(ticks - at))) for at in positions)


def apply_phi(qparams: dict, cfg: TokenizerConfig, si: int, h):
    """Phi_si(h) = (1 - r)·h + r·conv3x3(h) on (B, h, w, C); the identity when |quant_resi| <= 1e-6."""
    if cfg.phi_is_identity:
        return h
    k = phi_index_table(cfg.num_scales, cfg.share_quant_resi)[si]
    conv = jax.lax.conv_general_dilated(
        h, qparams["phi_kernels"][k], window_strides=(1, 1), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST) + qparams["phi_biases"][k]
    r = abs(cfg.quant_resi)
    return h * (1 - r) + conv * r


def nearest_codes(z_NC, codebook, using_znorm: bool):
    """Index of the nearest code per row: L2 (|z|² + |e|² - 2 z·e, as the reference) or cosine with `using_znorm`."""
    if using_znorm:
        z = z_NC / jnp.maximum(jnp.linalg.norm(z_NC, axis=-1, keepdims=True), 1e-12)
        e = codebook / jnp.maximum(jnp.linalg.norm(codebook, axis=-1, keepdims=True), 1e-12)
        return jnp.argmax(jnp.matmul(z, e.T, precision=_HIGHEST), axis=-1).astype(jnp.int32)
    dist = (jnp.sum(z_NC * z_NC, axis=1, keepdims=True) + jnp.sum(codebook * codebook, axis=1)
            - 2.0 * jnp.matmul(z_NC, codebook.T, precision=_HIGHEST))
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def embed_tokens(qparams: dict, tokens_Bl, pn: int):
    """(B, pn²) token ids -> (B, pn, pn, C) code embeddings."""
    b = tokens_Bl.shape[0]
    return jnp.take(qparams["codebook"], tokens_Bl, axis=0).reshape(b, pn, pn, -1)


def embed_ids(qparams: dict, cfg: TokenizerConfig, ids):
    """Token ids (...) -> their code vectors (..., C): codebook rows, or the BSQ codes of their bits."""
    if cfg.quantizer == "bsq":
        return bsq.ids_to_codes(ids, cfg.bits)
    return jnp.take(qparams["codebook"], ids, axis=0)


def code_vectors(qparams: dict, cfg: TokenizerConfig):
    """(V, C) float32: the vector of every token id (a BSQ tokenizer's 2^d codes are built here, for index heads)."""
    if cfg.quantizer == "bsq":
        return bsq.code_table(cfg.bits)
    return qparams["codebook"].astype(jnp.float32)


def _embed_map(qparams: dict, cfg: TokenizerConfig, tokens_Bl, pn: int):
    return embed_ids(qparams, cfg, tokens_Bl).reshape(tokens_Bl.shape[0], pn, pn, -1)


def scale_contribution(qparams: dict, cfg: TokenizerConfig, si: int, h_BhwC):
    """What scale si adds to f_hat: Phi_si(bicubic(h -> latent size)); no resize at the last scale. BSQ: the codes
    brought to the latent size bilinearly, no Phi."""
    if cfg.quantizer == "bsq":
        return bsq.scale_contribution(cfg, si, h_BhwC)
    if si != cfg.num_scales - 1:
        h_BhwC = bicubic_resize(h_BhwC, cfg.latent_size)
    return apply_phi(qparams, cfg, si, h_BhwC)


def _check_latent(f, cfg: TokenizerConfig, name: str):
    if f.ndim != 4 or f.shape[1:] != (cfg.latent_size, cfg.latent_size, cfg.z_channels):
        raise ValueError(f"{name}: expected (B, {cfg.latent_size}, {cfg.latent_size}, {cfg.z_channels}) "
                         f"features for patch_nums {cfg.patch_nums}, got shape {f.shape}")


def _check_tokens(tokens, cfg: TokenizerConfig, count: int, name: str):
    if len(tokens) < count:
        raise ValueError(f"{name}: need token maps for {count} scales, got {len(tokens)}")
    for si, (t, pn) in enumerate(zip(tokens, cfg.patch_nums)):
        if t.ndim != 2 or t.shape[1] != pn * pn:
            raise ValueError(f"{name}: tokens[{si}] must have shape (B, {pn * pn}) for scale {pn}x{pn}, "
                             f"got {t.shape}")


def _quantize_scales(qparams: dict, f, cfg: TokenizerConfig):
    """The encoding recursion; yields (tokens (B, pn²), contribution h, f_hat after this scale) per scale."""
    b, _, _, c = f.shape
    f_rest, f_hat = f, jnp.zeros_like(f)
    for si, pn in enumerate(cfg.patch_nums):
        z = area_resize(f_rest, pn)   # identity at the last scale (pn == latent size)
        tokens = nearest_codes(jax.lax.stop_gradient(z).reshape(-1, c), qparams["codebook"], cfg.using_znorm)
        tokens = tokens.reshape(b, pn * pn)
        h = scale_contribution(qparams, cfg, si, embed_tokens(qparams, tokens, pn))
        f_hat = f_hat + h
        f_rest = f_rest - jax.lax.stop_gradient(h)
        yield tokens, h, f_hat


def f_to_tokens(qparams: dict, f, cfg: TokenizerConfig):
    """f (B, h, w, C) -> (tokens: list of (B, pn²) int32, f_hats: list of the cumulative f_hat after each scale)."""
    _check_latent(f, cfg, "f_to_tokens")
    if cfg.quantizer == "bsq":
        return bsq.f_to_tokens(f, cfg)
    f = f.astype(jnp.float32)
    tokens, f_hats = [], []
    for t, _, f_hat in _quantize_scales(qparams, f, cfg):
        tokens.append(t)
        f_hats.append(f_hat)
    return tokens, f_hats


def tokens_to_fhat(qparams: dict, tokens, cfg: TokenizerConfig, all_scales: bool = False):
    """Token maps of every scale -> the final f_hat (B, h, w, C), or with `all_scales` the list after each scale."""
    _check_tokens(tokens, cfg, cfg.num_scales, "tokens_to_fhat")
    f_hat, f_hats = None, []
    for si, pn in enumerate(cfg.patch_nums):
        h = scale_contribution(qparams, cfg, si, _embed_map(qparams, cfg, tokens[si], pn))
        f_hat = h if f_hat is None else f_hat + h
        f_hats.append(f_hat)
    return f_hats if all_scales else f_hat


def resolve_resize(cfg: TokenizerConfig, resize: str = "auto") -> str:
    """How the next scale's input is resized from f_hat: 'auto' is VAR's area for the VQ quantizer, Infinity's
    bilinear for BSQ; 'area' / 'bilinear' as given."""
    if resize == "auto":
        return "bilinear" if cfg.quantizer == "bsq" else "area"
    if resize not in bsq.NEXT_INPUT_RESIZES:
        raise ValueError(f"next-scale input resize must be 'auto' or one of {bsq.NEXT_INPUT_RESIZES}, got {resize!r}")
    return resize


def next_scale_input(qparams: dict, cfg: TokenizerConfig, si: int, f_hat, h_BhwC, resize: str = "auto"):
    """One sampler step: add scale si's embedding map h (B, pn_si, pn_si, C) to f_hat.

    Returns (f_hat, next_input) with next_input = area(f_hat -> pn_{si+1}) (see `resolve_resize`) flattened to
    (B, pn_{si+1}², C), or None after the last scale. h may be E[idx] or soft (Gumbel) embeddings.
    """
    f_hat = f_hat + scale_contribution(qparams, cfg, si, h_BhwC.astype(jnp.float32))
    if si == cfg.num_scales - 1:
        return f_hat, None
    pn_next = cfg.patch_nums[si + 1]
    resized = bsq.resize_next_input(f_hat, pn_next, resolve_resize(cfg, resize))
    return f_hat, resized.reshape(f_hat.shape[0], pn_next * pn_next, -1)


def teacher_forcing_input(qparams: dict, tokens, cfg: TokenizerConfig, resize: str = "auto"):
    """The transformer's input for every scale but the first: (B, L - pn0², C), from ground-truth tokens."""
    _check_tokens(tokens, cfg, cfg.num_scales - 1, "teacher_forcing_input")
    b, s = tokens[0].shape[0], cfg.latent_size
    f_hat = jnp.zeros((b, s, s, cfg.z_channels), jnp.float32)
    inputs = []
    for si in range(cfg.num_scales - 1):
        f_hat, nxt = next_scale_input(qparams, cfg, si, f_hat,
                                      _embed_map(qparams, cfg, tokens[si], cfg.patch_nums[si]), resize)
        inputs.append(nxt)
    if not inputs:
        return jnp.zeros((b, 0, cfg.z_channels), jnp.float32)
    return jnp.concatenate(inputs, axis=1)


def quantize_for_training(qparams: dict, f, cfg: TokenizerConfig):
    """The quantizer's training forward (the reference's `VectorQuantizer2.forward`).

    Returns (f_hat_st, vq_loss, tokens, hits):
      f_hat_st  f + sg(f_hat - f): the decoder input, straight-through to the encoder;
      vq_loss   mean over scales of beta·mse(sg(f_hat), f) + mse(f_hat, sg(f)), f_hat the cumulative
                reconstruction after that scale (gradients reach the encoder, codebook and Phi convs);
      tokens    list of (B, pn²) int32;
      hits      (num_scales, V) float32 code counts per scale, for `update_usage_ema` / `code_usage_percent`.
    """
    _check_latent(f, cfg, "quantize_for_training")
    if cfg.quantizer == "bsq":
        return bsq.quantize_for_training(f, cfg)
    f = f.astype(jnp.float32)
    f_sg = jax.lax.stop_gradient(f)
    loss, tokens, hits = 0.0, [], []
    f_hat = None
    for t, _, f_hat in _quantize_scales(qparams, f_sg, cfg):
        loss = loss + cfg.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2) + jnp.mean((f_hat - f_sg) ** 2)
        tokens.append(t)
        hits.append(jnp.bincount(t.reshape(-1), length=cfg.vocab_size).astype(jnp.float32))
    f_hat_st = f + jax.lax.stop_gradient(f_hat - f)
    return f_hat_st, loss / cfg.num_scales, tokens, jnp.stack(hits)


def usage_shape(cfg: TokenizerConfig) -> tuple[int, int]:
    """Shape of the usage statistics: (num_scales, V) code hits, or with BSQ (num_scales, bits) counts of ones."""
    return (cfg.num_scales, cfg.bits if cfg.quantizer == "bsq" else cfg.vocab_size)


def usage_percent(cfg: TokenizerConfig, ema_SV, batch_size: int):
    """Per scale, % of the codes used (`code_usage_percent`), or with BSQ of the bits used both ways
    (`bsq.bit_usage_percent`), from the usage EMA of global batches of `batch_size` images."""
    if cfg.quantizer == "bsq":
        return bsq.bit_usage_percent(ema_SV, [batch_size * pn * pn for pn in cfg.patch_nums])
    return code_usage_percent(ema_SV, batch_size * cfg.latent_size * cfg.latent_size)


def update_usage_ema(ema_SV, hits_SV, num_updates):
    """The reference's code-usage EMA: copy on the first update, decay 0.9 for the next 99, then 0.99."""
    decay = jnp.where(num_updates < USAGE_EMA_WARMUP_UPDATES, USAGE_EMA_DECAY_WARMUP, USAGE_EMA_DECAY)
    decay = jnp.where(num_updates == 0, 0.0, decay)
    return ema_SV * decay + hits_SV * (1 - decay)


def code_usage_percent(ema_SV, cells_per_update: int):
    """Per scale, % of codes whose EMA hit count reaches 8% of a uniform share (cells = global batch · h · w)."""
    margin = cells_per_update / ema_SV.shape[1] * USAGE_MARGIN_FRACTION
    return jnp.mean((ema_SV >= margin).astype(jnp.float32), axis=1) * 100
