"""LPIPS perceptual distance (Zhang et al. 2018, the `lpips` package's 'vgg' variant) in NNX, NHWC.

d(x, y) = sum over the 5 VGG16 taps k of mean_hw( w_k · (n(F_k(x)) - n(F_k(y)))² ), where F_k is the VGG16
activation after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, n() divides by the channel L2 norm (+1e-10), and
w_k >= 0 are the learned linear heads. Inputs in [-1, 1] are first shifted/scaled by the package's constants.

Nothing is downloaded: the weights come from two files the user gives,
  - a torchvision VGG16 state_dict (`features.<i>.weight/bias`; classifier keys are ignored), and
  - the lpips package's linear heads (`weights/v0.1/vgg.pth`: `lin<k>.model.1.weight`, shape (1, C_k, 1, 1)),
read with var_jax.checkpoints.read_state_dict (.pth via torch weights_only, or .npz with the same keys). The
widths are read from the shapes, so the tests can use a narrow VGG with random weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.checkpoints import read_state_dict

# torchvision `vgg16().features` indices of the 3x3 convs, grouped by the block whose last ReLU LPIPS taps.
VGG16_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_WIDTHS = (64, 128, 256, 512, 512)
# lpips.ScalingLayer: ImageNet-style normalisation expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10       # lpips.normalize_tensor


def _frozen_conv(cin, cout, rngs):
    return nnx.Conv(cin, cout, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs,
                    kernel_metadata={"out_sharding": ("kernel", "kernel", "conv_in", "conv_out")},
                    bias_metadata={"out_sharding": ("conv_out",)})


class LPIPS(nnx.Module):
    """Frozen perceptual network: never handed to an optimizer, gradients flow only to its inputs."""

    def __init__(self, widths=VGG16_WIDTHS, *, rngs: nnx.Rngs):
        blocks, cin = [], 3
        for width, indices in zip(widths, VGG16_CONV_INDICES):
            convs = []
            for _ in indices:
                convs.append(_frozen_conv(cin, width, rngs))
                cin = width
            blocks.append(nnx.List(convs))
        self.blocks = nnx.List(blocks)
        self.heads = nnx.List([nnx.Param(jnp.zeros((w,), jnp.float32), out_sharding=("conv_in",)) for w in widths])

    def features(self, images):
        x = (images.astype(jnp.float32) - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
        taps = []
        for k, convs in enumerate(self.blocks):
            if k:   # 2x2 max-pool between blocks
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            for conv in convs:
                x = jax.nn.relu(conv(x))
            taps.append(x)
        return taps

    def __call__(self, images, reconstructions):
        """(B, H, W, 3) pair in [-1, 1] -> (B,) distances. H, W must be divisible by 16 (four max-pools)."""
        if images.shape != reconstructions.shape or images.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two (B, H, W, 3) images of one shape, got {images.shape} and "
                             f"{reconstructions.shape}")
        batch = images.shape[0]
        both = self.features(jnp.concatenate([images, reconstructions], axis=0))
        total = 0.0
        for feats, head in zip(both, self.heads):
            norm = feats / (jnp.sqrt(jnp.sum(jnp.square(feats), axis=-1, keepdims=True)) + NORMALIZE_EPS)
            diff = jnp.square(norm[:batch] - norm[batch:])
            total = total + jnp.mean(diff @ head[...], axis=(1, 2))
        return total


def _vgg_widths(vgg_sd) -> tuple[int, ...]:
    widths = []
    for indices in VGG16_CONV_INDICES:
        key = f"features.{indices[0]}.weight"
        if key not in vgg_sd:
            raise KeyError(f"VGG16 state_dict has no {key!r} (expected torchvision `vgg16().state_dict()` keys)")
        widths.append(int(np.shape(vgg_sd[key])[0]))
    return tuple(widths)


def _lin_weight(lin_sd, k):
    # lpips stores Dropout + Conv as `model.1` (use_dropout=True, the released heads) or `model.0` without dropout.
    for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight"):
        if key in lin_sd:
            return np.asarray(lin_sd[key], np.float32)
    raise KeyError(f"LPIPS linear heads have no 'lin{k}.model.1.weight' (the lpips package's vgg.pth keys)")


def lpips_from_state_dicts(vgg_sd, lin_sd) -> LPIPS:
    """Build LPIPS from a torchvision VGG16 state_dict and the lpips linear-head state_dict (numpy arrays)."""
    widths = _vgg_widths(vgg_sd)
    model = nnx.eval_shape(lambda: LPIPS(widths, rngs=nnx.Rngs(0)))   # structure only: every value is set below
    cin = 3
    for k, (convs, indices) in enumerate(zip(model.blocks, VGG16_CONV_INDICES)):
        for conv, index in zip(convs, indices):
            w = np.asarray(vgg_sd[f"features.{index}.weight"], np.float32)
            b = np.asarray(vgg_sd[f"features.{index}.bias"], np.float32)
            if w.shape != (widths[k], cin, 3, 3) or b.shape != (widths[k],):
                raise ValueError(f"VGG16 features.{index}: weight {w.shape} / bias {b.shape}, expected "
                                 f"{(widths[k], cin, 3, 3)} / {(widths[k],)}")
            conv.kernel.set_value(jnp.asarray(w.transpose(2, 3, 1, 0)))   # (O, I, kh, kw) -> (kh, kw, I, O)
            conv.bias.set_value(jnp.asarray(b))
            cin = widths[k]
        lin = _lin_weight(lin_sd, k)
        if lin.shape != (1, widths[k], 1, 1):
            raise ValueError(f"LPIPS lin{k} weight has shape {lin.shape}, expected {(1, widths[k], 1, 1)}")
        model.heads[k].set_value(jnp.asarray(lin.reshape(-1)))
    return model


def load_lpips(vgg_path: str, lin_path: str) -> LPIPS:
    """LPIPS from the two weight files (.pth or .npz), see the module docstring."""
    return lpips_from_state_dicts(read_state_dict(vgg_path), read_state_dict(lin_path))
