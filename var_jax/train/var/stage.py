"""The VAR training stage: frozen tokenizer + VAR transformer, built from a config (see configs/common.py).

The steps read images and tokenise them with the frozen tokenizer, or, with data.name='tokens', a token set's ids
(data/tokens.py) and build only the teacher-forcing input from them; token sets made with another tokenizer
(config, scales, vocabulary, weights) or image size are refused before anything compiles.

With a BSQ tokenizer (tokenizer/bsq.py): `model.head='bitwise'` (transformer/bitwise_head.py), `model.input_resize`
and `loss.bitwise_self_correction=p` (var/self_correction.py; needs images, not a token set)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from var_jax.checkpoints import model_parts, save_model_dir
from var_jax.data.pipeline import global_batch_from_host
from var_jax.data.tokens import TokenSetError, check_matches, read_meta, token_dtype, tokenizer_identity
from var_jax.sample.sampler import SampleOptions, make_sample_fn
from var_jax.sharding import replicated, state_shardings
from var_jax.train import optimizer
from var_jax.train.grad_accum import grad_accum_steps
from var_jax.train.held_out import eval_settings, make_evaluator
from var_jax.train.stage import ConfigError, Stage, check_batch_divides, load_tokenizer_for
from var_jax.train.state import abstract_train_state, init_train_state, jit_train_step
from var_jax.train.var import flops
from var_jax.train.var.evaluate import make_var_eval_step, var_val_metrics
from var_jax.train.var.loss import token_weights
from var_jax.train.var.progressive import progressive_from_config
from var_jax.train.var.self_correction import FIELD as SELF_CORRECTION_FIELD, rate_steps
from var_jax.train.var.step import VarStepConfig, make_ids_teacher_fn, make_tokenizer_fn, make_var_train_step
from var_jax.transformer import VAR, RunSettings, VARConfig, preset
from var_jax.transformer.config import RUN_SETTINGS, check_tokenizer_pairing

# VARConfig fields that the config's `model` section may set; -1 means "derive" (see configs/common.py).
_DERIVED = ("width", "heads", "num_classes", "drop_path_rate", "init_adaln_gamma")


def run_settings_from(config):
    """The run settings of a training config: `compute_dtype`, `model.remat`, `model.attention_impl`."""
    try:
        return RunSettings(compute_dtype=config.compute_dtype, remat=config.model.get("remat", "none"),
                           attention_impl=config.model.get("attention_impl", "auto")).resolved()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def var_config_from(config, tok_cfg, dataset_classes: int):
    """VARConfig from the `model` section: -1 fields derived from depth, the tokenizer and the dataset; the run
    settings from `run_settings_from`."""
    m = {k: v for k, v in dict(config.model).items() if k not in RUN_SETTINGS}
    num_classes = int(m.pop("num_classes"))
    if num_classes == -1:
        num_classes = dataset_classes
    elif num_classes < dataset_classes:
        raise ConfigError(f"model.num_classes: {num_classes} is smaller than the dataset's {dataset_classes} "
                          f"classes (class ids up to {dataset_classes - 1} would be out of range)")
    fields = {k: v for k, v in m.items() if not (k in _DERIVED and v == -1)}
    fields.update(num_classes=num_classes, vocab_size=tok_cfg.vocab_size, z_channels=tok_cfg.z_channels,
                  patch_nums=tuple(tok_cfg.patch_nums))
    depth = int(fields.pop("depth"))
    settings = run_settings_from(config)
    try:
        check_tokenizer_pairing(fields.get("head", "index"), fields.get("order", "scale"), tok_cfg)
        if 6 <= depth <= 36 and "width" not in fields:
            return preset(depth, **fields).with_run_settings(settings)
        return VARConfig(depth=depth, **fields).with_run_settings(settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {str(e).replace('VARConfig.', 'model.')}") from None


def self_correction_from(config, tok_cfg, from_tokens: bool) -> float:
    """`loss.bitwise_self_correction` (0 when the config has no such field), checked against the tokenizer/data."""
    p = float(config.loss.get("bitwise_self_correction", 0.0))
    try:
        rate_steps(p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if p and tok_cfg.quantizer != "bsq":
        raise ConfigError(f"{SELF_CORRECTION_FIELD}: flips the bits of a BSQ tokenizer (quantizer='bsq'); this "
                          f"tokenizer's quantizer is {tok_cfg.quantizer!r}")
    if p and from_tokens:
        raise ConfigError(f"{SELF_CORRECTION_FIELD}: re-quantizes the encoder's features, which a token set "
                          "(data.name='tokens') does not hold; train from images")
    return p


def build_var_stage(config, mesh, dataset_classes: int) -> Stage:
    check_batch_divides(int(config.batch_size), mesh)
    accum = grad_accum_steps(config, mesh)
    eval_cfg = eval_settings(config, mesh)
    tok_cfg, tokenizer = load_tokenizer_for(config, mesh)
    var_cfg = var_config_from(config, tok_cfg, dataset_classes)
    from_tokens = config.data.get("name") == "tokens"
    self_correction = self_correction_from(config, tok_cfg, from_tokens)
    step_cfg = VarStepConfig(patch_nums=var_cfg.patch_nums, label_smoothing=float(config.loss.label_smoothing),
                             scale_weights=tuple(config.loss.scale_weights) or None, grad_accum_steps=accum,
                             bits=var_cfg.bits)
    try:
        token_weights(var_cfg.patch_nums, step_cfg.scale_weights)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    total_steps, pg = int(config.total_steps), float(config.progressive.fraction)
    try:
        sched = progressive_from_config(config.progressive, var_cfg.num_scales, total_steps,
                                        optimizer.warmup_length(config.optim, total_steps))
        optimizer.learning_rate_schedule(config.optim, int(config.batch_size), total_steps, pg)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    model_fn = lambda rngs: VAR(var_cfg, rngs=rngs)
    parts = model_parts(model_fn)
    tx = optimizer.make_optimizer(config.optim, batch_size=int(config.batch_size), total_steps=total_steps,
                                  mask=optimizer.decay_mask(parts.param_vars), progressive_fraction=pg)
    layout = abstract_train_state(parts, tx, mesh)

    tok_graphdef, tok_params = nnx.split(tokenizer)
    tok_state = nnx.to_pure_dict(tok_params)
    tok_shardings = nnx.to_pure_dict(state_shardings(tok_params, mesh))
    if from_tokens:
        _check_token_sets(config, bool(eval_cfg.every), tok_cfg, tokenizer)
    inputs = _StepInput.of(from_tokens, config, tok_graphdef, tok_cfg, var_cfg, self_correction)
    # held out: a token set when data.eval_dir names one, else the images the training tokens came from
    eval_inputs = _StepInput.of(from_tokens and bool(config.data.get("eval_dir")), config, tok_graphdef, tok_cfg,
                                var_cfg)
    batch_example = {inputs.key: inputs.example(int(config.batch_size)),
                     "label": jax.ShapeDtypeStruct((int(config.batch_size),), np.int32),
                     "skipped_images": jax.ShapeDtypeStruct((int(config.batch_size),), np.int32)}
    if sched.enabled:
        batch_example["loss_ramp"] = jax.ShapeDtypeStruct((), np.float32)
    compiled: dict[int, object] = {}

    def step_fn(step: int):
        prog_si = sched.scale_at(step)
        if prog_si not in compiled:
            cfg = dataclasses.replace(step_cfg, prog_si=prog_si)
            compiled[prog_si] = jit_train_step(make_var_train_step(parts, tx, cfg, inputs.tokenize,
                                                                   input_key=inputs.key),
                                               layout, mesh, batch_example, tok_shardings)
        return compiled[prog_si]

    def make_batch(local, step: int):
        labels = np.asarray(local["label"])
        if labels.size and (labels.min() < 0 or labels.max() >= var_cfg.num_classes):
            raise ConfigError(f"model.num_classes: batch has class ids in [{labels.min()}, {labels.max()}], "
                              f"outside [0, {var_cfg.num_classes})")
        batch = global_batch_from_host({inputs.key: local[inputs.key], "label": labels.astype(np.int32),
                                        "skipped_images": local["skipped_images"]}, mesh)
        if sched.enabled:
            batch["loss_ramp"] = jax.make_array_from_process_local_data(replicated(mesh),
                                                                        np.float32(sched.ramp_at(step)))
        return batch

    def export(state, directory):
        save_model_dir(directory, tokenizer=(tok_cfg, tokenizer),
                       var=(var_cfg, parts.merge(state.params)), overwrite=True)

    sample_fn = _make_sampler(config, parts, var_cfg, tokenizer, tok_cfg)
    return Stage(
        name="var", layout=layout, init=lambda: init_train_state(model_fn, tx, layout, mesh, int(config.seed)),
        step_fn=step_fn, make_batch=make_batch, frozen=tok_state, export=export,
        model_config={"var": var_cfg.to_dict(), "tokenizer": tok_cfg.to_dict()},
        tokens_per_example=var_cfg.seq_len, flops_per_example=flops.var_train_flops_per_example(var_cfg),
        sample=sample_fn, best_metric="val/loss",
        evaluate=_make_evaluator(config, eval_cfg, mesh, parts, layout, var_cfg, eval_inputs, tok_state,
                                 tok_shardings),
        describe=f"VAR depth {var_cfg.depth} width {var_cfg.width} ({var_cfg.compute_dtype}), L={var_cfg.seq_len}, "
                 f"V={var_cfg.vocab_size}; lr schedule {optimizer.schedule_name(config.optim, pg)}"
                 + (f", progressive from scale {sched.start_scale} to {sched.fraction:g} of the run, ramp "
                    f"{sched.ramp_steps:g} steps" if sched.enabled else "")
                 + (f"; bitwise head ({var_cfg.bits} bits)" if var_cfg.bits else "")
                 + (f", bitwise self-correction p={self_correction:g}" if self_correction else "")
                 + (f"; {accum} micro-batches of {int(config.batch_size) // accum} per step" if accum > 1 else "")
                 + (f"; token set {config.data.dir}" if from_tokens else ""))


@dataclasses.dataclass(frozen=True)
class _StepInput:
    """What a step reads from its batch: `key` ('image' or 'tokens'), its shape per batch size, and the function
    that turns it into (tokens, teacher input) with the frozen tokenizer's parameters."""
    key: str
    tokenize: Callable
    example: Callable[[int], jax.ShapeDtypeStruct]

    @classmethod
    def of(cls, from_tokens: bool, config, tok_graphdef, tok_cfg, var_cfg,
           self_correction: float = 0.0) -> "_StepInput":
        if from_tokens:
            return cls("tokens", make_ids_teacher_fn(tok_graphdef, tok_cfg, order=var_cfg.order,
                                                     input_resize=var_cfg.input_resize),
                       lambda b: jax.ShapeDtypeStruct((b, var_cfg.seq_len), token_dtype(tok_cfg.vocab_size)))
        size = int(config.data.image_size)
        return cls("image", make_tokenizer_fn(tok_graphdef, tok_cfg, order=var_cfg.order,
                                              input_resize=var_cfg.input_resize, self_correction=self_correction),
                   lambda b: jax.ShapeDtypeStruct((b, size, size, 3), np.uint8))


def _check_token_sets(config, evaluates: bool, tok_cfg, tokenizer):
    """data.dir (and data.eval_dir when evaluating) must hold tokens of this tokenizer at this image size."""
    identity = tokenizer_identity(tok_cfg, tokenizer)
    for field in ("dir",) + (("eval_dir",) if evaluates and config.data.get("eval_dir") else ()):
        directory = config.data[field]
        try:
            check_matches(read_meta(directory), directory, identity, int(config.data.image_size))
        except TokenSetError as e:
            raise ConfigError(f"data.{field}: {e}") from None


def _make_evaluator(config, eval_cfg, mesh, parts, layout, var_cfg, inputs, tok_state, tok_shardings):
    """The held-out evaluation (var/evaluate.py), or None when eval_every is 0."""
    if not eval_cfg.every:
        return None
    size = eval_cfg.batch_size
    batch_example = {inputs.key: inputs.example(size),
                     "label": jax.ShapeDtypeStruct((size,), np.int32),
                     "mask": jax.ShapeDtypeStruct((size,), np.float32)}
    if eval_cfg.class_dropout:
        batch_example["index"] = jax.ShapeDtypeStruct((), np.int32)
    step = make_var_eval_step(parts, var_cfg.patch_nums, inputs.tokenize, class_dropout=eval_cfg.class_dropout,
                              seed=int(config.seed), input_key=inputs.key, bits=var_cfg.bits)
    return make_evaluator(step, lambda sums: var_val_metrics(sums, var_cfg.patch_nums), mesh=mesh,
                          param_shardings=layout.shardings.params, frozen=tok_state, frozen_shardings=tok_shardings,
                          batch_example=batch_example)


def _make_sampler(config, parts, var_cfg, tokenizer, tok_cfg):
    """Class-conditional samples for the PNG grid (var_jax.sample), or None when sampling is off."""
    if int(config.sample_every) <= 0:
        return None

    options = SampleOptions(cfg=1.5, top_k=min(900, var_cfg.vocab_size), top_p=0.96)
    tok_graphdef, tok_state = nnx.split(tokenizer)
    n = int(config.num_sample_images)

    def sample(state, step: int):
        var_graphdef, var_state = nnx.split(parts.merge(state.params))
        fn = make_sample_fn(var_graphdef, tok_graphdef, options)
        labels = np.arange(n, dtype=np.int32) % var_cfg.num_classes
        out = fn(var_state, tok_state, labels, np.arange(n, dtype=np.int32), int(config.seed) + step)
        images = out["images"]
        if jax.process_count() > 1:
            images = multihost_utils.process_allgather(images, tiled=True)
        return np.asarray(jax.device_get(images))
    return sample
