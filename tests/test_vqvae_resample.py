"""Downsample pads as the reference does (right and bottom, then a stride-2 conv); the sub-pixel Upsample equals
nearest x2 then a 3x3 conv."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax.tokenizer.vqvae import Downsample, Upsample

DN = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, kernel, bias, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=DN,
                                        precision=jax.lax.Precision.HIGHEST) + bias


@pytest.mark.parametrize("hw", [(8, 6), (7, 5)])
def test_downsample_equals_padded_strided_conv(hw):
    seed = np.random.SeedSequence().entropy % 2**31
    layer = Downsample(16, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (2, *hw, 16))
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))   # the reference's F.pad(x, (0, 1, 0, 1))
    want = _plain_conv(padded, layer.conv.kernel[...], layer.conv.bias[...], 2, "VALID")
    got = layer(x)
    assert got.shape == want.shape == (2, (hw[0] - 2) // 2 + 1, (hw[1] - 2) // 2 + 1, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_upsample_equals_nearest_then_conv():
    seed = np.random.SeedSequence().entropy % 2**31
    layer = Upsample(16, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (2, 5, 3, 16))
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    want = _plain_conv(up, layer.conv.kernel[...], layer.conv.bias[...], 1, ((1, 1), (1, 1)))
    got = layer(x)
    assert got.shape == (2, 10, 6, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
