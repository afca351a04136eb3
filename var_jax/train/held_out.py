"""Held-out evaluation during training: every `eval_every` steps (and at the last step) a stage's jitted pure
eval step runs once over the whole held-out split (data/pipeline.make_eval_dataset: source order, the last batch
padded and masked, so every image counts exactly once) and returns per-batch *sums*; they are added up on the
host in float64 and turned into `val/...` metrics by the stage (var/evaluate.py, tokenizer/evaluate.py).

Config fields (all run settings: changing them never refuses a resume):
  eval_every          steps between evaluations; -1 = checkpoint_every, 0 = off
  eval_batch_size     global batch of the eval step; 0 = batch_size
  eval_class_dropout  VAR: drop class labels at the training rate during evaluation as the reference does
                      (default False: every image conditioned on its class)
  data.eval_split     the held-out split; '' = the source's default (data/sources.HELD_OUT_SPLITS)
  data.eval_dir       with data.name='tokens': a held-out token set (`var-jax tokenize --split val`), evaluated
                      without the tokenizer's encoder; '' = the held-out images the training tokens came from
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import numpy as np

from var_jax.data.pipeline import global_batch_from_host
from var_jax.sharding import replicated
from var_jax.train.stage import ConfigError, TrainingError, check_batch_divides
from var_jax.train.state import batch_shardings


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    every: int              # 0 = off
    batch_size: int
    class_dropout: bool


def eval_settings(config, mesh=None) -> EvalSettings:
    """The resolved eval fields of a training config (absent fields take their defaults), checked."""
    every, batch_size = config.get("eval_every", -1), config.get("eval_batch_size", 0)
    for field, value in (("eval_every", every), ("eval_batch_size", batch_size)):
        if not isinstance(value, int) or value < (-1 if field == "eval_every" else 0):
            raise ConfigError(f"{field}: must be an integer >= {-1 if field == 'eval_every' else 0}, got {value!r}")
    settings = EvalSettings(every=int(config.checkpoint_every) if every == -1 else every,
                            batch_size=batch_size or int(config.batch_size),
                            class_dropout=bool(config.get("eval_class_dropout", False)))
    if mesh is not None and settings.every:
        check_batch_divides(settings.batch_size, mesh, field="eval_batch_size")
    return settings


def make_evaluator(eval_step: Callable, finish: Callable[[dict], dict], *, mesh, param_shardings, frozen,
                   frozen_shardings, batch_example: dict) -> Callable[[Any, Iterable[dict]], dict]:
    """evaluate(state, host batches) -> {'val/...': float} from a pure eval_step(params, batch, frozen) -> {name:
    sum over the batch's real images}. The batch holds the keys of `batch_example` (host numpy arrays, 'mask'
    among them); an 'index' key, when present in the example, is filled with the batch's number in the pass."""
    rep = replicated(mesh)
    step = jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings(mesh, batch_example), frozen_shardings),
                   out_shardings=rep)
    host_keys = [k for k in batch_example if k != "index"]

    def evaluate(state, host_batches: Iterable[dict]) -> dict:
        sums = []
        for index, local in enumerate(host_batches):
            batch = global_batch_from_host({k: local[k] for k in host_keys}, mesh)
            if "index" in batch_example:
                batch["index"] = jax.make_array_from_process_local_data(rep, np.int32(index))
            sums.append(step(state.params, batch, frozen))   # dispatched; fetched together below
        if not sums:
            raise TrainingError("the held-out split gave no batch")
        fetched = jax.device_get(sums)
        return finish({k: np.sum([np.asarray(s[k], np.float64) for s in fetched], axis=0) for k in fetched[0]})
    return evaluate
