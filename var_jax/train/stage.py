"""What the trainer needs from a training stage (tokenizer or VAR), and the config checks both share.

A stage is built from the config and the mesh before anything is compiled; the trainer then only calls:
  init()                   -> a fresh train state, born sharded
  step_fn(step)            -> the jitted step for that update number: fn(state, batch, frozen) -> (state, metrics)
  make_batch(local, step)  -> the global device batch from this host's numpy batch
  export(state, directory) -> write the final model directory (var_jax.checkpoints.save_model_dir)
  sample(state, step)      -> optional: images in [0, 1] (N, H, W, 3) numpy for a PNG grid, or None
  evaluate(state, batches) -> optional: {'val/...': float} over the held-out host batches (train/held_out.py);
                              the model with the lowest `best_metric` is kept as WORKDIR/best_model
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from var_jax.checkpoints import CheckpointError, load_model_dir, model_parts, resolve_model_dir, split_model
from var_jax.tokenizer.vqvae import VQVAE


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


class TrainingError(RuntimeError):
    """A run that cannot go on (the CLI prints the one-line message without a traceback)."""


class NonFiniteError(TrainingError):
    """Too many non-finite steps in a row, or a non-finite value about to be written."""


@dataclasses.dataclass
class Stage:
    name: str
    layout: Any                                   # state.StateLayout
    init: Callable[[], Any]
    step_fn: Callable[[int], Callable]
    make_batch: Callable[[dict, int], Any]
    frozen: Any                                   # arguments the step reads but never updates (e.g. the tokenizer)
    export: Callable[[Any, Any], None]
    model_config: dict                            # recorded beside the checkpoints; a mismatch refuses to resume
    tokens_per_example: int | None = None
    flops_per_example: float | None = None
    sample: Callable[[Any, int], Any] | None = None
    describe: str = ""
    evaluate: Callable[[Any, Any], dict] | None = None
    best_metric: str = ""


def check_positive(config, *fields: str):
    for field in fields:
        value = config[field]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field}: must be a positive integer, got {value!r}")


def check_batch_divides(batch_size: int, mesh, field: str = "batch_size"):
    """The global batch must split evenly over the data-parallel devices and over the hosts."""
    from var_jax.sharding import data_parallel_size
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise ConfigError(f"{field}: {batch_size} is not divisible by the {dp} data-parallel devices of the "
                          f"mesh {tuple(mesh.shape.values())} (data × fsdp)")
    if batch_size % jax.process_count():
        raise ConfigError(f"{field}: {batch_size} is not divisible by the {jax.process_count()} processes")


def load_tokenizer_for(config, mesh=None):
    """(TokenizerConfig, VQVAE) from `config.tokenizer_checkpoint` (a model directory or a tokenizer training
    workdir), with the run's patch_nums: a new module holding the loaded parameters (the loaded one is left as
    it was; buffers such as the Phi tables are rebuilt for the run's scales)."""
    path = config.get("tokenizer_checkpoint")
    if not path:
        raise ConfigError("tokenizer_checkpoint: required (a model directory from `var-jax convert`, or a "
                          "tokenizer training workdir)")
    try:
        bundle = load_model_dir(resolve_model_dir(path), mesh=mesh)
    except CheckpointError as e:
        raise ConfigError(f"tokenizer_checkpoint: {e}") from None
    if bundle.tokenizer is None:
        raise ConfigError(f"tokenizer_checkpoint: {path} holds no tokenizer")
    cfg = tokenizer_config_for(bundle.tokenizer_config, config)
    _, params, _ = split_model(bundle.tokenizer)
    tokenizer = model_parts(lambda rngs: VQVAE(cfg, rngs=rngs)).merge(params)
    tokenizer.eval()
    return cfg, tokenizer


def tokenizer_config_for(tok_cfg, config):
    """A new tokenizer config with the run's patch_nums, checked against the image size."""
    try:
        cfg = dataclasses.replace(tok_cfg, patch_nums=tuple(int(p) for p in config.patch_nums))
        if cfg.num_phi != tok_cfg.num_phi:
            raise ValueError(f"a tokenizer with one Phi per scale (share_quant_resi=0) was trained with "
                             f"{tok_cfg.num_scales} scales, not {cfg.num_scales}")
        return cfg.validate(image_size=int(config.data.image_size))
    except ValueError as e:
        raise ConfigError(f"patch_nums: {e}") from None
