"""The trainer's tokenizer stage (`config.stage = 'tokenizer'`, see var_jax/train/stage.py for the contract).

Config sections (configs/digits_tokenizer.py shows them all):
  tokenizer             TokenizerConfig fields except patch_nums (the top-level `patch_nums` is used); with
                        quantizer='bsq' (Infinity's BSQ, `bits` bits) vocab_size and z_channels follow from bits
  tokenizer_checkpoint  optional warm start: a model dir (`var-jax convert`) or a training workdir; the model's
                        own hyper-parameters are then used and the `tokenizer` section is ignored
  loss                  TokenizerLossConfig fields
  discriminator         base_channels, num_layers (used when loss.disc_weight > 0)
  lpips                 vgg_path, lin_path (needed when loss.lpips_weight > 0; nothing is downloaded)
  optim, disc_optim     the optax recipe of var_jax.train.optimizer for the generator / the discriminator
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.checkpoints import model_parts, save_model_dir
from var_jax.data.pipeline import global_batch_from_host
from var_jax.data.transforms import to_model_range_on_device
from var_jax.sharding import replicated, state_shardings
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import image_to_tokens, tokens_to_image
from var_jax.train import optimizer
from var_jax.train.grad_accum import grad_accum_steps
from var_jax.train.held_out import eval_settings, make_evaluator
from var_jax.train.stage import ConfigError, Stage, check_batch_divides, load_tokenizer_for
from var_jax.train.state import jit_train_step, param_count
from var_jax.train.tokenizer.discriminator import logit_grid_size
from var_jax.train.tokenizer.evaluate import make_tokenizer_eval_step, tokenizer_val_metrics
from var_jax.train.tokenizer.lpips import load_lpips
from var_jax.train.tokenizer.state import (DiscriminatorConfig, TokenizerTrainModules, init_tokenizer_state,
                                              make_tokenizer_optimizer, tokenizer_state_layout, warm_start)
from var_jax.train.tokenizer.step import (TokenizerLossConfig, check_grad_accum, check_quantizer,
                                          make_tokenizer_train_step)


def _section(config, name: str, cls):
    try:
        return cls(**dict(config[name]))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{name}: {e}") from None


def tokenizer_config_from(config):
    """(TokenizerConfig, loaded VQVAE or None): from the warm-start checkpoint if given, else the config."""
    image_size = int(config.data.image_size)
    if config.get("tokenizer_checkpoint"):
        return load_tokenizer_for(config)
    fields = {**dict(config.tokenizer), "patch_nums": tuple(int(p) for p in config.patch_nums)}
    if fields.get("quantizer") == "bsq":   # Infinity's: the vocabulary is 2^bits, the latent one channel per bit
        fields.update(vocab_size=-1, z_channels=-1)
    try:
        return TokenizerConfig(**fields).validate(image_size=image_size), None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tokenizer: {str(e).replace('TokenizerConfig.', 'tokenizer.')}") from None


def _lpips(config, loss_cfg, mesh):
    """(merge fn, frozen params, their shardings), or Nones when LPIPS is off."""
    if not loss_cfg.use_lpips:
        return None, None, None
    for field in ("vgg_path", "lin_path"):
        if not config.lpips.get(field):
            raise ConfigError(f"lpips.{field}: required when loss.lpips_weight > 0 (LPIPS weights are never "
                              "downloaded: give a torchvision VGG16 state_dict and the lpips package's vgg.pth)")
    try:
        model = load_lpips(config.lpips.vgg_path, config.lpips.lin_path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"lpips: {e}") from None
    graphdef, params = nnx.split(model)
    shardings = nnx.to_pure_dict(state_shardings(params, mesh))
    params = jax.device_put(nnx.to_pure_dict(params), shardings)
    return (lambda p: nnx.merge(graphdef, p)), params, shardings


def build_tokenizer_stage(config, mesh, dataset_classes: int) -> Stage:
    del dataset_classes   # the tokenizer ignores labels
    batch_size, total_steps, image_size = int(config.batch_size), int(config.total_steps), int(config.data.image_size)
    check_batch_divides(batch_size, mesh)
    eval_cfg = eval_settings(config, mesh)
    tok_cfg, pretrained = tokenizer_config_from(config)
    if tok_cfg.dropout > 0:
        raise ConfigError("tokenizer.dropout: the tokenizer trainer does not support dropout (set it to 0)")
    loss_cfg = _section(config, "loss", TokenizerLossConfig)
    accum = grad_accum_steps(config, mesh)
    try:
        loss_cfg.validate()
        check_grad_accum(loss_cfg, accum)
        check_quantizer(loss_cfg, tok_cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    disc_cfg = None
    if loss_cfg.use_gan:
        disc_cfg = _section(config, "discriminator", DiscriminatorConfig)
        if logit_grid_size(image_size, disc_cfg.num_layers) < 1:
            raise ConfigError(f"discriminator.num_layers: {disc_cfg.num_layers} layers leave no patch logits on "
                              f"{image_size} px images")
    merge_lpips, lpips_params, lpips_shardings = _lpips(config, loss_cfg, mesh)
    try:
        for name in ("optim", "disc_optim"):
            optimizer.learning_rate_schedule(config[name], batch_size, total_steps)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{name}: {e}") from None

    model_fn = lambda rngs: TokenizerTrainModules(tok_cfg, disc_cfg, rngs=rngs)  # noqa: E731
    parts = model_parts(model_fn)
    tx = make_tokenizer_optimizer(parts, config.optim, config.disc_optim, batch_size=batch_size,
                                  total_steps=total_steps)
    layout = tokenizer_state_layout(parts, tx, mesh, tok_cfg)
    step = jit_train_step(make_tokenizer_train_step(parts.merge, tx, tok_cfg, loss_cfg, merge_lpips, accum),
                          layout, mesh,
                          {"image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), np.uint8),
                           "skipped_images": jax.ShapeDtypeStruct((batch_size,), np.int32)},
                          lpips_shardings)

    def init():
        state = init_tokenizer_state(model_fn, tx, layout, mesh, int(config.seed))
        return state if pretrained is None else warm_start(state, pretrained, layout)

    make_batch, sample = _reconstruction_grid(config, parts, mesh)
    evaluate = None
    if eval_cfg.every:
        size = eval_cfg.batch_size
        evaluate = make_evaluator(
            make_tokenizer_eval_step(parts.merge, tok_cfg, loss_cfg.recon_kind),
            lambda sums: tokenizer_val_metrics(sums, tok_cfg), mesh=mesh,
            param_shardings=layout.shardings.params, frozen=None, frozen_shardings=None,
            batch_example={"image": jax.ShapeDtypeStruct((size, image_size, image_size, 3), np.uint8),
                           "mask": jax.ShapeDtypeStruct((size,), np.float32)})

    def export(state, directory):
        save_model_dir(directory, tokenizer=(tok_cfg, parts.merge(state.params).generator), overwrite=True)

    n_gen = param_count(layout.abstract.params["generator"])
    extras = [f"GAN ({loss_cfg.gan_kind}, weight {loss_cfg.disc_weight}, from step {loss_cfg.disc_start})"
              if loss_cfg.use_gan else "no GAN", f"LPIPS {loss_cfg.lpips_weight}" if loss_cfg.use_lpips else "no LPIPS"]
    if pretrained is not None:
        extras.append(f"warm start from {config.tokenizer_checkpoint}")
    if accum > 1:
        extras.append(f"{accum} micro-batches of {batch_size // accum} per step")
    return Stage(
        name="tokenizer", layout=layout, init=init, step_fn=lambda _: step,
        make_batch=make_batch, frozen=lpips_params, export=export, sample=sample, evaluate=evaluate,
        best_metric="val/rec_loss",
        model_config={"tokenizer": tok_cfg.to_dict(),
                      "discriminator": dataclasses.asdict(disc_cfg) if disc_cfg else None},
        describe=f"tokenizer ch {tok_cfg.ch} x {tok_cfg.ch_mult}, "
                 f"{f'BSQ {tok_cfg.bits} bits' if tok_cfg.quantizer == 'bsq' else f'V={tok_cfg.vocab_size}'}, "
                 f"Cvae={tok_cfg.z_channels}, patch_nums {tok_cfg.patch_nums}, {n_gen:,} params; {', '.join(extras)}")


def _reconstruction_grid(config, parts, mesh):
    """(make_batch, sample): the first global batch's first images are kept, and `sample` returns them beside
    their current reconstructions (originals then reconstructions, [0, 1]) for the trainer's PNG grid."""
    count = min(int(config.num_sample_images), int(config.batch_size))
    kept = {}

    def make_batch(local, step: int):
        batch = global_batch_from_host({"image": local["image"], "skipped_images": local["skipped_images"]}, mesh)
        if int(config.sample_every) > 0 and "images" not in kept:
            kept["images"] = jax.jit(lambda x: to_model_range_on_device(x[:count]),
                                     out_shardings=replicated(mesh))(batch["image"])
        return batch

    def originals_and_reconstructions(params, images):
        generator = parts.merge(params).generator
        return jnp.concatenate([images, tokens_to_image(generator, image_to_tokens(generator, images))], axis=0)
    # replicated output: every process can read it
    grid_images = jax.jit(originals_and_reconstructions, out_shardings=replicated(mesh))

    def sample(state, step: int):
        return (np.asarray(jax.device_get(grid_images(state.params, kept["images"]))) + 1.0) / 2.0

    return make_batch, (sample if int(config.sample_every) > 0 else None)
