"""The tokenizer train step: one pure function (state, batch, frozen) -> (state, metrics).

Generator update (VQVAE: encoder, codebook, Phi convs, decoder):
    loss = recon_weight·recon + lpips_weight·LPIPS                                (= nll, as VQGAN names it)
         + vq_weight·vq                (the quantizer's beta-weighted multi-scale VQ loss)
         + disc_factor(step)·w_adaptive·g_loss                                     (when the GAN is on)
with w_adaptive = ||∇_last nll|| / (||∇_last g_loss|| + 1e-4), clipped to [0, 1e4], times disc_weight; `last` is
the decoder's last conv kernel. Discriminator update (when the GAN is on): disc_factor(step)·d_loss on the real
images vs the same reconstructions (taken before the generator update, one forward serves both).
Both updates go through one `optax.multi_transform` holding the two optimizers (params {'generator',
'discriminator'}), so the train state keeps the shape of var_jax.train.state.TrainState, plus the code-usage EMA.

The batch is {'image': (B, H, W, 3) uint8 (or float in [-1, 1]), ...}; `frozen` is the LPIPS network's params
(or None). Everything runs in float32.

With the BSQ quantizer (tokenizer/bsq.py, cfg.quantizer='bsq') `vq` is Infinity's quantizer loss (commitment and
entropy penalty; loss.vq_weight is then Infinity's lfq_weight), the usage EMA counts each bit's ones per scale,
`code_usage` is the % of bits used both ways and `bit_ones_{j}` the % of positions where bit j is 1 (EMA, mean
over scales); there is no codebook to restart.

Gradient accumulation (`grad_accum_steps` k > 1, train/grad_accum.py): both updates' gradients, the losses and
metrics (all means over images) are averaged over k micro-batches, the code hit counts summed, and the encoder
features that a dead-code restart draws from are put back together in the batch's order, so the step equals
the k = 1 step up to float32 rounding (it draws no per-image random numbers). The adaptive GAN weight is the
exception, refused with k > 1: a ratio of whole-batch gradient norms, which a mean of micro-batch terms cannot
give.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from var_jax.data.transforms import to_model_range_on_device
from var_jax.tokenizer import quantizer
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.train.tokenizer import losses
from var_jax.train.grad_accum import FIELD as GRAD_ACCUM_FIELD, accumulate
from var_jax.train.tokenizer.code_usage import restart_dead_codes
from var_jax.train.tokenizer.state import TokenizerTrainState, get_path, replace_path
from var_jax.train.optimizer import current_hyperparams
from var_jax.train.state import finish_step

# Where the adaptive GAN weight measures gradients: the decoder's last conv kernel (VQGAN's `last_layer`).
LAST_LAYER_PATH = ("generator", "decoder", "conv_out", "kernel")
CODEBOOK_PATH = ("generator", "codebook")


@dataclasses.dataclass(frozen=True)
class TokenizerLossConfig:
    recon_kind: str = "l1"           # 'l1' | 'l2'
    recon_weight: float = 1.0
    vq_weight: float = 1.0           # on the quantizer's loss, which already carries beta
    lpips_weight: float = 0.0        # needs LPIPS weights (frozen); 0 = off
    disc_weight: float = 0.0         # 0 = no GAN
    gan_kind: str = "hinge"          # 'hinge' | 'non_saturating'
    disc_start: int = 0              # GAN terms are off before this step
    adaptive_disc_weight: bool = True
    restart_every: int = 0           # dead-code restart period in steps; 0 = off
    restart_threshold: float = 1.0   # a code is dead when its hit EMA summed over scales is below this

    @property
    def use_gan(self) -> bool:
        return self.disc_weight > 0

    @property
    def use_lpips(self) -> bool:
        return self.lpips_weight > 0

    def validate(self) -> "TokenizerLossConfig":
        def fail(field, why):
            raise ValueError(f"tokenizer loss config: {field} {why} (got {getattr(self, field)!r})")
        if self.recon_kind not in losses.RECONSTRUCTION_KINDS:
            fail("recon_kind", f"must be one of {losses.RECONSTRUCTION_KINDS}")
        if self.gan_kind not in losses.GAN_KINDS:
            fail("gan_kind", f"must be one of {losses.GAN_KINDS}")
        for field in ("recon_weight", "vq_weight", "lpips_weight", "disc_weight", "restart_threshold"):
            if getattr(self, field) < 0:
                fail(field, "must be >= 0")
        for field in ("disc_start", "restart_every"):
            if getattr(self, field) < 0:
                fail(field, "must be >= 0")
        return self


def check_grad_accum(loss_cfg: TokenizerLossConfig, grad_accum_steps: int):
    """ValueError naming the field when the loss cannot be accumulated over micro-batches exactly."""
    if grad_accum_steps > 1 and loss_cfg.use_gan and loss_cfg.adaptive_disc_weight:
        raise ValueError(f"{GRAD_ACCUM_FIELD}: {grad_accum_steps} micro-batches cannot reproduce the adaptive GAN "
                         "weight (a ratio of whole-batch gradient norms); use 1, or loss.adaptive_disc_weight=False")


def check_quantizer(loss_cfg: TokenizerLossConfig, tokenizer_cfg: TokenizerConfig):
    """ValueError naming the field when the loss asks for what the quantizer lacks (BSQ has no codebook)."""
    if loss_cfg.restart_every and tokenizer_cfg.quantizer == "bsq":
        raise ValueError("tokenizer loss config: restart_every re-draws dead codebook entries; the BSQ quantizer "
                         "has no codebook (set restart_every=0)")


def make_tokenizer_train_step(merge: Callable[[Any], Any], tx: optax.GradientTransformation,
                              tokenizer_cfg: TokenizerConfig, loss_cfg: TokenizerLossConfig,
                              merge_lpips: Callable[[Any], Any] | None = None, grad_accum_steps: int = 1):
    """The pure step. `merge(params)` rebuilds the modules (`.generator`, `.discriminator`) from the params dict
    {'generator', 'discriminator'?}; `merge_lpips(frozen)` the LPIPS network (needed when lpips_weight > 0)."""
    loss_cfg.validate()
    check_grad_accum(loss_cfg, grad_accum_steps)
    if loss_cfg.use_lpips and merge_lpips is None:
        raise ValueError("tokenizer loss config: lpips_weight > 0 needs LPIPS weights (lpips.vgg_path / lin_path)")
    check_quantizer(loss_cfg, tokenizer_cfg)
    cfg, lc = tokenizer_cfg, loss_cfg

    def train_step(state: TokenizerTrainState, batch, frozen):
        if lc.use_gan != ("discriminator" in state.params):
            raise ValueError("tokenizer train step: the params must hold a discriminator exactly when "
                             f"disc_weight > 0 (disc_weight={lc.disc_weight}, params: {sorted(state.params)})")
        restart_key = jax.random.fold_in(state.rng, state.step)
        factor = losses.disc_factor(state.step, lc.disc_start) if lc.use_gan else jnp.float32(0.0)

        def micro_step(micro, _):
            """Gradients and metrics of one micro-batch (the whole batch when k = 1): (means, sums, per image)."""
            images = to_model_range_on_device(micro["image"])

            def nll_of(rec):
                recon = losses.reconstruction_loss(images, rec, lc.recon_kind)
                lpips = jnp.mean(merge_lpips(frozen)(images, rec)) if lc.use_lpips else jnp.float32(0.0)
                return lc.recon_weight * recon + lc.lpips_weight * lpips, (recon, lpips)

            def generator_loss(gen_params):
                params = {**state.params, "generator": gen_params}
                modules = merge(params)
                f = modules.generator.encode(images)
                f_hat, vq, _, hits = quantizer.quantize_for_training(modules.generator.quantizer_params(), f, cfg)

                def decode(last_kernel):   # the decoder as a function of its last layer, for the adaptive weight
                    generator = merge(replace_path(params, LAST_LAYER_PATH, last_kernel)).generator
                    return generator.decoder(generator.post_quant_conv(f_hat))   # unclamped: clamping kills gradients

                aux = {"vq": vq, "hits": hits, "f": f}
                if not lc.use_gan:
                    rec = decode(get_path(params, LAST_LAYER_PATH))
                    nll, (aux["recon"], aux["lpips"]) = nll_of(rec)
                    return nll + lc.vq_weight * vq, (rec, aux)
                # One forward: the vjp of the last layer gives both gradients the adaptive weight compares.
                rec, last_vjp = jax.vjp(decode, get_path(params, LAST_LAYER_PATH))
                nll, nll_vjp, (aux["recon"], aux["lpips"]) = jax.vjp(nll_of, rec, has_aux=True)
                g_loss, g_vjp = jax.vjp(
                    lambda r: losses.generator_adversarial_loss(modules.discriminator(r), lc.gan_kind), rec)
                if lc.adaptive_disc_weight:
                    (nll_grad,) = last_vjp(*nll_vjp(jnp.ones_like(nll)))
                    (g_grad,) = last_vjp(*g_vjp(jnp.ones_like(g_loss)))
                    weight = losses.adaptive_gan_weight(nll_grad, g_grad, lc.disc_weight)
                else:
                    weight = jnp.float32(lc.disc_weight)
                aux.update(g_loss=g_loss, disc_weight=weight)
                return nll + lc.vq_weight * vq + factor * weight * g_loss, (rec, aux)

            (loss, (rec, aux)), gen_grads = jax.value_and_grad(generator_loss, has_aux=True)(
                state.params["generator"])
            means = {"grads": {"generator": gen_grads}, "loss": loss, "recon": aux["recon"], "vq": aux["vq"],
                     "lpips": aux["lpips"], "psnr": losses.psnr(images, jnp.clip(rec, -1.0, 1.0))}

            if lc.use_gan:
                fake = jax.lax.stop_gradient(rec)

                def discriminator_loss(disc_params):
                    discriminator = merge({**state.params, "discriminator": disc_params}).discriminator
                    logits_real, logits_fake = discriminator(images), discriminator(fake)
                    d_loss = losses.discriminator_loss(logits_real, logits_fake, lc.gan_kind)
                    return factor * d_loss, (d_loss, jnp.mean(logits_real), jnp.mean(logits_fake))

                (_, (d_loss, real_mean, fake_mean)), disc_grads = jax.value_and_grad(
                    discriminator_loss, has_aux=True)(state.params["discriminator"])
                means["grads"]["discriminator"] = disc_grads
                means.update(g_loss=aux["g_loss"], d_loss=d_loss, disc_weight=aux["disc_weight"],
                             logits_real=real_mean, logits_fake=fake_mean)
            features = jax.lax.stop_gradient(aux["f"]) if lc.restart_every else None
            return means, {"hits": aux["hits"]}, features

        means, sums, features = accumulate(micro_step, {"image": batch["image"]}, grad_accum_steps)
        grads = means.pop("grads")
        metrics = {**means, "grad_norm": optax.tree.norm(grads["generator"])}
        if lc.use_gan:
            metrics.update(disc_factor=factor, d_grad_norm=optax.tree.norm(grads["discriminator"]))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # The reference's per-scale code usage: hit-count EMA and % of codes above its margin.
        ema = quantizer.update_usage_ema(state.usage_ema, sums["hits"], state.usage_updates)
        if lc.restart_every:
            due = (state.step + 1) % lc.restart_every == 0
            codebook = get_path(params, CODEBOOK_PATH)
            new_codebook, dead = restart_dead_codes(codebook, ema, features, restart_key, lc.restart_threshold)
            params = replace_path(params, CODEBOOK_PATH, jnp.where(due, new_codebook, codebook))
            metrics["codes_restarted"] = jnp.where(due, jnp.sum(dead), 0)
        images = to_model_range_on_device(batch["image"])
        usage = quantizer.usage_percent(cfg, ema, images.shape[0])
        metrics["code_usage"] = jnp.mean(usage)
        metrics.update({f"code_usage_{pn}": usage[si] for si, pn in enumerate(cfg.patch_nums)})
        if cfg.quantizer == "bsq":
            ones = 100 * ema / jnp.asarray([images.shape[0] * pn * pn for pn in cfg.patch_nums], jnp.float32)[:, None]
            metrics.update({f"bit_ones_{j}": share for j, share in enumerate(jnp.mean(ones, axis=0))})
        metrics.update(current_hyperparams(generator_opt_state(opt_state)))

        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, usage_ema=ema,
                                  usage_updates=state.usage_updates + 1)
        # A non-finite loss or gradient (generator or discriminator) drops the whole update, usage EMA included.
        new_state, counters = finish_step(state, new_state, metrics["loss"], optax.tree.norm(grads),
                                          {**batch, "image": images})
        return new_state, {**metrics, **counters}

    return train_step


def generator_opt_state(opt_state):
    """The generator optimizer's own state inside the multi_transform state (for its injected lr / wd)."""
    return opt_state.inner_states["generator"].inner_state
