"""What the trainer needs from a training stage (tokenizer or VAR), and the config checks both share.

A stage is built from the config and the mesh before anything is compiled; the trainer then only calls:
  init()                   -> a fresh train state, born sharded
  step_fn(step)            -> the jitted step for that update number: fn(state, batch, frozen) -> (state, metrics)
  make_batch(local, step)  -> the global device batch from this host's numpy batch
  export(state, directory) -> write the final model directory (var_jax.checkpoints.save_model_dir)
  sample(state, step)      -> optional: images in [0, 1] (N, H, W, 3) numpy for a PNG grid, or None
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


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


def check_positive(config, *fields: str):
    for field in fields:
        value = config[field]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field}: must be a positive integer, got {value!r}")


def check_batch_divides(batch_size: int, mesh):
    """The global batch must split evenly over the data-parallel devices and over the hosts."""
    from var_jax.sharding import data_parallel_size
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise ConfigError(f"batch_size: {batch_size} is not divisible by the {dp} data-parallel devices of the "
                          f"mesh {tuple(mesh.shape.values())} (data × fsdp)")
    if batch_size % jax.process_count():
        raise ConfigError(f"batch_size: {batch_size} is not divisible by the {jax.process_count()} processes")
