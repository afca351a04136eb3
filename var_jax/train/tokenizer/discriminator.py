"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, as used by VQGAN), in NNX, NHWC.

Layout (ndf = base channels, n = num_layers):
  conv4x4/2 (3 -> ndf), LeakyReLU(0.2)
  n-1 times: conv4x4/2 (no bias), norm, LeakyReLU(0.2)     channels ndf * min(2^k, 8)
  conv4x4/1 (no bias), norm, LeakyReLU(0.2)
  conv4x4/1 -> 1 logit per patch
All 4x4 convs pad 1 on each side, as the reference.

Normalisation: GroupNorm instead of the original BatchNorm. BatchNorm needs batch statistics (a cross-device
reduction whose result depends on how the batch is split) and running averages that would have to be carried
as mutable state through the pure train step and behave differently in train and eval. GroupNorm normalises
each image on its own, so the discriminator is a pure function of (params, image): identical under any
sharding or batch size. The group count is gcd(32, channels).
"""
from __future__ import annotations

import math

import jax
from flax import nnx

LEAKY_SLOPE = 0.2          # pix2pix / VQGAN
INIT_STD = 0.02            # VQGAN's weights_init: conv weights N(0, 0.02)
MAX_CHANNEL_MULT = 8       # pix2pix caps the width at 8 * ndf


def _conv(cin: int, cout: int, stride: int, use_bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=use_bias,
                    kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs,
                    kernel_metadata={"out_sharding": ("kernel", "kernel", "conv_in", "conv_out")},
                    bias_metadata={"out_sharding": ("conv_out",)})


def _norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, num_groups=math.gcd(32, channels), epsilon=1e-5, rngs=rngs,
                         scale_metadata={"out_sharding": ("norm",)}, bias_metadata={"out_sharding": ("norm",)})


def logit_grid_size(size: int, num_layers: int) -> int:
    """Side of the logit grid for an input side `size`: each stride-2 4x4 conv (pad 1) halves it, each stride-1
    one takes 1 off."""
    return size // 2 ** num_layers - 2


class PatchDiscriminator(nnx.Module):
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, *, rngs: nnx.Rngs):
        if num_layers < 1:
            raise ValueError(f"discriminator num_layers must be >= 1, got {num_layers}")
        self.conv_in = _conv(in_channels, base_channels, 2, True, rngs)
        convs, norms = [], []
        cin = base_channels
        for k in range(1, num_layers + 1):
            cout = base_channels * min(2 ** k, MAX_CHANNEL_MULT)
            stride = 2 if k < num_layers else 1
            convs.append(_conv(cin, cout, stride, False, rngs))
            norms.append(_norm(cout, rngs))
            cin = cout
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.conv_out = _conv(cin, 1, 1, True, rngs)

    def output_size(self, size: int) -> int:
        return logit_grid_size(size, len(self.convs))

    def __call__(self, images):
        """images (B, H, W, C) in [-1, 1] -> patch logits (B, h, w, 1)."""
        if min(self.output_size(images.shape[1]), self.output_size(images.shape[2])) < 1:
            raise ValueError(f"discriminator: images of {images.shape[1]}x{images.shape[2]} px are too small for "
                             f"{len(self.convs)} layers (no patch logits left); use fewer layers or larger images")
        x = jax.nn.leaky_relu(self.conv_in(images), LEAKY_SLOPE)
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.leaky_relu(norm(conv(x)), LEAKY_SLOPE)
        return self.conv_out(x)
