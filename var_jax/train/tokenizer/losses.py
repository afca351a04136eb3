"""The tokenizer's training losses: the VQGAN recipe (Esser et al. 2021) around VAR's multi-scale VQ loss.

generator loss = recon + beta-weighted VQ loss (computed by the quantizer) + lpips_weight * LPIPS
                 + disc_factor(step) * adaptive_weight * g_loss
discriminator loss = disc_factor(step) * (hinge | non-saturating) loss on real vs reconstructed images.

All functions are pure and take / return float32 arrays (images NHWC in [-1, 1]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

RECONSTRUCTION_KINDS = ("l1", "l2")
GAN_KINDS = ("hinge", "non_saturating")

# VQGAN's constants for the adaptive weight: the denominator guard and the clip of the ratio.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


def reconstruction_loss(images, reconstructions, kind: str = "l1"):
    """Mean absolute (l1) or squared (l2) pixel error."""
    diff = reconstructions.astype(jnp.float32) - images.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"reconstruction loss kind must be one of {RECONSTRUCTION_KINDS}, got {kind!r}")


def discriminator_loss(logits_real, logits_fake, kind: str = "hinge"):
    """VQGAN's discriminator losses, each the mean of its real and fake halves."""
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
    if kind == "non_saturating":
        # -log sigmoid(real) - log(1 - sigmoid(fake)) = softplus(-real) + softplus(fake)
        return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))
    raise ValueError(f"GAN loss kind must be one of {GAN_KINDS}, got {kind!r}")


def generator_adversarial_loss(logits_fake, kind: str = "hinge"):
    """The generator's side: -E[D(fake)] for hinge (as VQGAN), -log sigmoid(D(fake)) for non-saturating."""
    if kind == "hinge":
        return -jnp.mean(logits_fake)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-logits_fake))
    raise ValueError(f"GAN loss kind must be one of {GAN_KINDS}, got {kind!r}")


def adaptive_gan_weight(nll_grad, g_grad, disc_weight: float):
    """VQGAN's balance: ||d nll / d last|| / (||d g_loss / d last|| + 1e-4), clipped to [0, 1e4], times
    disc_weight, where `last` is the decoder's last layer. Gradients flow through neither input."""
    nll_norm = jnp.linalg.norm(jnp.ravel(nll_grad).astype(jnp.float32))
    g_norm = jnp.linalg.norm(jnp.ravel(g_grad).astype(jnp.float32))
    weight = jnp.clip(nll_norm / (g_norm + ADAPTIVE_WEIGHT_EPS), 0.0, ADAPTIVE_WEIGHT_MAX)
    return jax.lax.stop_gradient(weight) * disc_weight


def disc_factor(step, disc_start: int):
    """1 once the discriminator has started (step >= disc_start), else 0: the GAN terms are off before it."""
    return jnp.where(jnp.asarray(step) >= disc_start, 1.0, 0.0).astype(jnp.float32)


def psnr(images, reconstructions):
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2), per image then averaged."""
    mse = jnp.mean(jnp.square(reconstructions.astype(jnp.float32) - images.astype(jnp.float32)),
                   axis=tuple(range(1, images.ndim)))
    return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))
