"""The multi-scale VQVAE: convolutional encoder/decoder (NHWC) around the residual quantizer's parameters.

Module and attribute names mirror the reference state_dict (`encoder.down.0.block.1.conv2`, `decoder.mid.attn_1`,
...) so that the converter (convert.py) is a mechanical rename + transpose. The quantizer's recursion itself is a set
of pure functions in quantizer.py, fed by `VQVAE.quantizer_params()`.

Initialisation (for training from scratch): every conv uses PyTorch's default Conv2d init, U(±1/sqrt(fan_in)) for
weights and biases, because the reference has no init routine of its own and its released tokenizer was trained
from that default; GroupNorm scale 1 / bias 0. The codebook is trunc_normal(std=0.05) (the reference's
`VectorQuantizer2.eini(0.05)`): the reference `nn.Embedding` default (std 1) is ~5x larger than the encoder features
at init, which maps every coarse-scale cell to the same code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.tokenizer import quantizer
from var_jax.tokenizer.config import NORM_GROUPS, TokenizerConfig

CODEBOOK_INIT_STD = 0.05


def _torch_default_uniform(fan_in: int):
    """PyTorch's default Conv2d/Linear init bound (kaiming_uniform with a=sqrt(5) gives the same 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def conv(in_ch: int, out_ch: int, kernel_size: int, *, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
    """A conv with PyTorch's padding convention (explicit, symmetric k//2 unless given) and default init."""
    pad = kernel_size // 2
    init = _torch_default_uniform(in_ch * kernel_size * kernel_size)
    return nnx.Conv(
        in_ch, out_ch, (kernel_size, kernel_size), strides=stride,
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        kernel_init=init, bias_init=init, rngs=rngs,
        kernel_metadata={"out_sharding": ("kernel", "kernel", "conv_in", "conv_out")},
        bias_metadata={"out_sharding": ("conv_out",)},
    )


class ChannelSumGroupNorm(nnx.GroupNorm):
    """nnx.GroupNorm (same parameters, same two-pass statistics E[(x-mean)^2], like PyTorch) whose NHWC statistics
    sum each channel over the positions first and the channels of a group after: XLA:CPU vectorises that
    reduction along the contiguous channel axis, where the one-step reduction over (positions, channels of a
    group) ran ~1.4x slower at 256 px x 160 channels. Equal up to float32 summation order."""

    def __call__(self, x, *, mask=None):
        if x.ndim != 4 or mask is not None:
            return super().__call__(x, mask=mask)
        batch, height, width, channels = x.shape
        per_group = channels // self.num_groups
        count = height * width * per_group

        def group_mean(channel_sums):   # (B, C) -> (B, 1, 1, C): each channel gets its group's mean
            means = channel_sums.reshape(batch, self.num_groups, per_group).sum(-1) / count
            return jnp.repeat(means, per_group, axis=-1)[:, None, None, :]

        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        centred = x - group_mean(x.sum(axis=(1, 2)))
        variance = group_mean(jnp.square(centred).sum(axis=(1, 2)))
        return centred * jax.lax.rsqrt(variance + self.epsilon) * self.scale[...] + self.bias[...]


def group_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # use_fast_variance=False: E[(x-mean)^2] like PyTorch, not E[x^2]-mean^2 (which loses digits on large means).
    return ChannelSumGroupNorm(channels, num_groups=NORM_GROUPS, epsilon=1e-6, use_fast_variance=False, rngs=rngs,
                               scale_metadata={"out_sharding": ("norm",)}, bias_metadata={"out_sharding": ("norm",)})


class ResnetBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float, *, rngs: nnx.Rngs):
        self.norm1 = group_norm(in_ch, rngs=rngs)
        self.conv1 = conv(in_ch, out_ch, 3, rngs=rngs)
        self.norm2 = group_norm(out_ch, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.conv2 = conv(out_ch, out_ch, 3, rngs=rngs)
        self.nin_shortcut = conv(in_ch, out_ch, 1, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = jax.nn.silu(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H·W positions; one 1x1 conv gives q|k|v in that channel order."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norm = group_norm(channels, rngs=rngs)
        self.qkv = conv(channels, 3 * channels, 1, rngs=rngs)
        self.proj_out = conv(channels, channels, 1, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, 1, c)   # (B, T, [q|k|v], heads=1, C)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])   # scale C^-0.5
        return x + self.proj_out(out.reshape(b, h, w, c))


def _conv_nhwc(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Downsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        # The reference pads right and bottom by one (not symmetric) before a stride-2 3x3 conv. (Regrouping the
        # taps into four stride-1 convs over the input's phases was ~2x faster with YNNPACK's convolutions; with
        # XLA's, var-jax's CPU default, the strided conv itself is ~1.5x faster than that at 256 px.)
        self.conv = conv(channels, channels, 3, rngs=rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


def _fold_taps(kernel, axis: int, phase: int):
    """3 taps along `axis` -> the 2 that output phase `phase` of a nearest-x2 upsample sees in the low-res input."""
    t0, t1, t2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    return jnp.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], axis=axis)


class Upsample(nnx.Module):
    """Nearest x2 then a 3x3 conv, computed as a sub-pixel conv on the low-res input.

    Output pixel (2i+a, 2j+b) sees only the low-res 2x2 neighbourhood rows {i-1, i} (a=0) or {i, i+1} (a=1) (same
    for columns), with the 3x3 taps summed accordingly. Four 2x2 convs do 16/36 of the FLOPs of the 3x3 conv at
    full resolution and never materialise the upsampled input. Equal up to float32 rounding (taps summed first).
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        k = self.conv.kernel[...]
        phases = [[_conv_nhwc(x, _fold_taps(_fold_taps(k, 0, pa), 1, pb), ((1 - pa, pa), (1 - pb, pb)))
                   for pb in (0, 1)] for pa in (0, 1)]
        out = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)   # (B, h, a, w, b, C)
        return out.reshape(b, 2 * h, 2 * w, k.shape[-1]) + self.conv.bias[...]


class Level(nnx.Module):
    """One resolution of the encoder or decoder: res blocks, each optionally followed by attention, then resampling."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, with_attn: bool, resample, dropout: float,
                 *, rngs: nnx.Rngs):
        blocks, attns = [], []
        for _ in range(num_blocks):
            blocks.append(ResnetBlock(in_ch, out_ch, dropout, rngs=rngs))
            in_ch = out_ch
            if with_attn:
                attns.append(AttnBlock(out_ch, rngs=rngs))
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        if resample == "down":
            self.downsample = Downsample(out_ch, rngs=rngs)
        elif resample == "up":
            self.upsample = Upsample(out_ch, rngs=rngs)
        self.resample = resample

    def __call__(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, channels: int, dropout: float, *, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, dropout, rngs=rngs)
        self.attn_1 = AttnBlock(channels, rngs=rngs)
        self.block_2 = ResnetBlock(channels, channels, dropout, rngs=rngs)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _one_sample_at_a_time(module: nnx.Module, fn, x):
    """fn over the batch one sample at a time (lax.map) on CPU; the whole batch at once elsewhere.

    On CPU the activations of one 256 px image (40 MiB per 160-channel map) are live instead of the batch's, which
    keeps the sampler's decode inside its memory budget; with XLA's own convolutions (var_jax/__init__.py) the speed
    is the same either way, and YNNPACK's ran ~1.5x faster per FLOP on one image than on a batch of 4. Every op in
    the encoder/decoder is per sample (GroupNorm and attention included), so the result is the same. Skipped when
    a Dropout is live: its RNG state would have to be updated inside the loop.
    """
    if x.shape[0] == 1 or jax.default_backend() != "cpu" or any(
            isinstance(m, nnx.Dropout) and not m.deterministic for _, m in nnx.iter_modules(module)):
        return fn(x)
    return jax.lax.map(lambda xi: fn(xi[None])[0], x)


class Encoder(nnx.Module):
    """(B, H, W, 3) in [-1, 1] -> (B, H/ds, W/ds, Cvae)."""

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = cfg.num_levels - 1
        self.conv_in = conv(3, cfg.ch, 3, rngs=rngs)
        self.down = nnx.List([
            Level((cfg.ch, *widths)[i], widths[i], cfg.num_res_blocks, i in cfg.attention_levels,
                  "down" if i != last else None, cfg.dropout, rngs=rngs)
            for i in range(cfg.num_levels)])
        self.mid = Mid(widths[-1], cfg.dropout, rngs=rngs)
        self.norm_out = group_norm(widths[-1], rngs=rngs)
        self.conv_out = conv(widths[-1], cfg.z_channels, 3, rngs=rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """(B, h, w, Cvae) -> (B, h·ds, w·ds, 3), not clamped."""

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = conv(cfg.z_channels, widths[-1], 3, rngs=rngs)
        self.mid = Mid(widths[-1], cfg.dropout, rngs=rngs)
        # up[i] is level i, as in the reference state_dict; they run from the last level down to 0.
        in_widths = [widths[i + 1] if i + 1 < cfg.num_levels else widths[-1] for i in range(cfg.num_levels)]
        self.up = nnx.List([
            Level(in_widths[i], widths[i], cfg.num_res_blocks + 1, i in cfg.attention_levels,
                  "up" if i != 0 else None, cfg.dropout, rngs=rngs)
            for i in range(cfg.num_levels)])
        self.norm_out = group_norm(widths[0], rngs=rngs)
        self.conv_out = conv(widths[0], 3, 3, rngs=rngs)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class VQVAE(nnx.Module):
    """Encoder -> quant_conv -> (multi-scale residual quantizer: VQ, or BSQ with cfg.quantizer='bsq') ->
    post_quant_conv -> Decoder."""

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        c = cfg.z_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.quant_conv = conv(c, c, cfg.quant_conv_ks, rngs=rngs)
        if cfg.quantizer == "vq":   # the BSQ quantizer (bsq.py) learns nothing: no codebook, no Phi
            self.codebook = nnx.Param(
                CODEBOOK_INIT_STD * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (cfg.vocab_size, c)),
                out_sharding=("vocab", "cvae"))
            # The Phi convs, stacked: (K, 3, 3, C, C) HWIO kernels and (K, C) biases; K = 0 when Phi is the identity.
            k = cfg.num_phi
            phi_init = _torch_default_uniform(c * 9)
            self.phi_kernels = nnx.Param(phi_init(rngs.params(), (k, 3, 3, c, c)),
                                         out_sharding=("layers", "kernel", "kernel", "conv_in", "conv_out"))
            self.phi_biases = nnx.Param(phi_init(rngs.params(), (k, c)), out_sharding=("layers", "conv_out"))
        self.post_quant_conv = conv(c, c, cfg.quant_conv_ks, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    def encode(self, img, *, per_sample: bool = False):
        """(B, H, W, 3) in [-1, 1] -> f (B, h, w, Cvae), the continuous features the quantizer sees.

        per_sample: on CPU, one image at a time (faster, equal up to float32 rounding). Off by default so that
        training keeps its batched program; inference entry points (image_to_tokens) turn it on.
        """
        if img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"VQVAE.encode expects NHWC images with 3 channels, got shape {img.shape}")
        fn = lambda x: self.quant_conv(self.encoder(x))
        return _one_sample_at_a_time(self, fn, img) if per_sample else fn(img)

    def decode(self, f_hat):
        """f_hat (B, h, w, Cvae) -> image (B, H, W, 3) clamped to [-1, 1]."""
        # inference only (training calls the unclamped decoder itself), so one sample at a time on CPU
        return _one_sample_at_a_time(self, lambda f: jnp.clip(self.decoder(self.post_quant_conv(f)), -1.0, 1.0),
                                     f_hat)

    def quantizer_params(self) -> dict:
        """The plain arrays the pure quantizer functions (quantizer.py) take (none for BSQ)."""
        if self.cfg.quantizer == "bsq":
            return {}
        return {"codebook": self.codebook[...], "phi_kernels": self.phi_kernels[...],
                "phi_biases": self.phi_biases[...]}


# The parameters only encoding reads. Decoding-only code (the sampler) leaves them out of its jitted arguments.
ENCODING_ONLY = nnx.Any(nnx.PathContains("encoder"), nnx.PathContains("quant_conv"))


def split_for_decoding(model: VQVAE):
    """(graphdef, state, encoder_spec): `model` split for jitted code that only decodes, its state without the
    encoding-only arrays (0.16 GiB of the released tokenizer's 0.41), so that they need not stay resident.
    encoder_spec is hashable (a jit static argument or cache key); merge_for_decoding undoes the split."""
    graphdef, encoding, state = nnx.split(model, ENCODING_ONLY, ...)
    spec = tuple((path, jax.ShapeDtypeStruct(v.shape, v.dtype), type(v)) for path, v in nnx.to_flat_state(encoding))
    return graphdef, state, spec


def merge_for_decoding(graphdef, state, encoder_spec=()) -> VQVAE:
    """The module back from split_for_decoding's parts, shape-only placeholders where the encoding-only
    parameters were: decode() runs, encode() raises. An empty spec merges a whole state (from nnx.split)."""
    placeholders = nnx.from_flat_state([(path, kind(shape)) for path, shape, kind in encoder_spec])
    return nnx.merge(graphdef, placeholders, state) if encoder_spec else nnx.merge(graphdef, state)


def image_to_tokens(model: VQVAE, img):
    """Images (B, H, W, 3) in [-1, 1] -> list of per-scale token maps (B, pn²) int32."""
    return quantizer.f_to_tokens(model.quantizer_params(), model.encode(img, per_sample=True), model.cfg)[0]


def tokens_to_image(model: VQVAE, tokens):
    """List of per-scale token maps (B, pn²) -> images (B, H, W, 3) in [-1, 1]."""
    return model.decode(quantizer.tokens_to_fhat(model.quantizer_params(), tokens, model.cfg))
