"""The VAR train step: one pure function (state, batch, frozen) -> (state, metrics).

With on-the-fly tokenisation (`tokenize=make_tokenizer_fn(...)`) the batch is {'image' (B,H,W,3) uint8 (or
float in [-1,1]), 'label' (B,)} and `frozen` is the tokenizer's parameters: the frozen tokenizer runs inside the
step in float32 (images -> [-1, 1] -> f -> per-scale tokens -> teacher-forcing input), without gradients.
From a token set (data/tokens.py; `tokenize=make_ids_teacher_fn(...)`, `input_key='tokens'`) the batch is
{'tokens' (B,L) uint16 or int32, 'label'}: the encoder never runs, the teacher-forcing input is built from the ids
with the frozen quantizer (codebook and Phi), exactly as the on-the-fly path builds it from the ids it computes.
Without either (`tokenize=None`) the batch carries pre-computed {'tokens' (B,L) int, 'teacher_input'
(B,L-1,Cvae), 'label'} and `frozen` is ignored (benchmarks).

A bitwise head (`bits` > 0) is trained with Infinity's per-bit loss (var/loss.py); with bitwise self-correction
(`make_tokenizer_fn(..., self_correction=p)`, var/self_correction.py) the frozen tokenizer's walk over the scales
flips bits of the history the input is built from, and the targets follow the corrupted history; its random
stream is fold_in(micro-batch key, FLIP_STREAM), which leaves the class-dropout and drop-path keys as they were.

An optional batch entry 'loss_ramp' (float32 scalar) scales the newest scale's loss weight in progressive
training (see progressive.py); `prog_si` (static) truncates the sequence to the first prog_si+1 scales.

Gradient accumulation (`grad_accum_steps` k > 1, train/grad_accum.py): the step tokenises, runs forward and
backward on one micro-batch of B/k examples at a time, averages gradients, loss and metrics over the k, then
makes one optimizer update. Micro-batch j draws its class dropout and drop-path masks from
fold_in(step key, j); with no randomness (cond_drop_rate = drop_path_rate = 0) the step equals the k = 1 step on
the whole batch up to float32 rounding, and in general it equals the mean of the k micro-batch gradients, each
computed with its own key, followed by one update. k = 1 is the step without accumulation, bit for bit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from var_jax.scale_config import scale_begin_ends
from var_jax.tokenizer import quantizer
from var_jax.train.var import loss as var_loss
from var_jax.train.grad_accum import accumulate
from var_jax.train.optimizer import current_hyperparams
from var_jax.train.var.progressive import truncated_weights
from var_jax.train.var.self_correction import self_corrected_tokens
from var_jax.checkpoints import ModelParts
from var_jax.data.transforms import to_model_range_on_device
from var_jax.train.state import TrainState, finish_step


@dataclasses.dataclass(frozen=True)
class VarStepConfig:
    patch_nums: tuple[int, ...]
    label_smoothing: float = 0.0
    scale_weights: tuple[float, ...] | None = None   # None = uniform over tokens (the reference)
    prog_si: int | None = None                       # None = all scales
    grad_accum_steps: int = 1                        # micro-batches per update (train/grad_accum.py)
    bits: int = 0                                    # a bitwise head's bits per token (VARConfig.bits); 0 = index head

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums) if self.prog_si is None else self.prog_si + 1


def raster_teacher_input(codebook, tokens):
    """Raster order's teacher forcing: the code vectors of tokens shifted by one, (B, L) -> (B, L-1, Cvae)
    (position t reads token t-1; position 0 is the start token)."""
    return jnp.take(codebook.astype(jnp.float32), tokens[:, :-1], axis=0)


def _check_order(tokenizer_cfg, order: str):
    if order == "raster" and tokenizer_cfg.num_scales != 1:
        raise ValueError(f"raster order needs a single-scale tokenizer, got patch_nums {tokenizer_cfg.patch_nums}")


# fold_in constant of the self-correction flips' random stream (see the module docstring)
FLIP_STREAM = 0x5C


def _tokens_and_teacher(qparams: dict, token_maps, tokenizer_cfg, order: str, resize: str = "auto", history=None):
    """Per-scale token maps [(B, pn²)] -> (tokens (B, L) int32, teacher input float32), no gradient: the one
    place both paths (images, token sets) build the transformer's input. `history`: other maps to build the input
    from (self-correction's corrupted ones); `resize`: VARConfig.input_resize."""
    if order == "raster":
        tokens = token_maps[0].astype(jnp.int32)
        teacher = raster_teacher_input(qparams["codebook"], tokens)
    else:
        teacher = quantizer.teacher_forcing_input(qparams, token_maps if history is None else history,
                                                  tokenizer_cfg, resize)
        tokens = jnp.concatenate([t.reshape(t.shape[0], -1) for t in token_maps], axis=1).astype(jnp.int32)
    return jax.lax.stop_gradient(tokens), jax.lax.stop_gradient(teacher.astype(jnp.float32))


def make_tokenizer_fn(tokenizer_graphdef, tokenizer_cfg, order: str = "scale", *, input_resize: str = "auto",
                      self_correction: float = 0.0) -> Callable:
    """(tokenizer params, images uint8 or in [-1, 1], key=None) -> (tokens (B, L) int32, teacher input (B, L -
    first_l, Cvae) float32), no gradient. order / input_resize: the transformer's VARConfig.order ('raster' wants
    a single-scale tokenizer) and .input_resize; self_correction: bitwise self-correction's p (BSQ tokenizers),
    applied when a key is given (training; held-out evaluation passes none)."""
    _check_order(tokenizer_cfg, order)

    def tokenize(tokenizer_state, images, key=None):
        tokenizer = nnx.merge(tokenizer_graphdef, tokenizer_state)
        f = tokenizer.encode(to_model_range_on_device(images), per_sample=True)   # frozen: inference path
        qparams = tokenizer.quantizer_params()
        if self_correction and key is not None:
            targets, history = self_corrected_tokens(f, tokenizer_cfg, self_correction, key)
            return _tokens_and_teacher(qparams, targets, tokenizer_cfg, order, input_resize, history)
        return _tokens_and_teacher(qparams, quantizer.f_to_tokens(qparams, f, tokenizer_cfg)[0], tokenizer_cfg,
                                   order, input_resize)
    return tokenize


def make_ids_teacher_fn(tokenizer_graphdef, tokenizer_cfg, order: str = "scale", *,
                        input_resize: str = "auto") -> Callable:
    """(tokenizer params, ids (B, L) of every scale concatenated, any integer dtype, key=None (unused)) -> what
    make_tokenizer_fn gives for the images those ids came from; only the quantizer's codebook and Phi convs are
    read."""
    _check_order(tokenizer_cfg, order)
    slices = scale_begin_ends(tuple(tokenizer_cfg.patch_nums))

    def from_ids(tokenizer_state, ids, key=None):
        del key   # self-correction needs the encoder's features, which a token set does not hold
        qparams = nnx.merge(tokenizer_graphdef, tokenizer_state).quantizer_params()
        ids = ids.astype(jnp.int32)
        return _tokens_and_teacher(qparams, [ids[:, begin:end] for begin, end in slices], tokenizer_cfg, order,
                                   input_resize)
    return from_ids


def make_var_train_step(parts: ModelParts, tx: optax.GradientTransformation, step_cfg: VarStepConfig,
                        tokenize: Callable | None = None, *, input_key: str = "image",
                        ) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict]]:
    """input_key: the batch entry `tokenize` reads, 'image' (make_tokenizer_fn) or 'tokens' (make_ids_teacher_fn)."""
    slices = scale_begin_ends(step_cfg.patch_nums)
    full_weights = var_loss.token_weights(step_cfg.patch_nums, step_cfg.scale_weights)
    num_scales = step_cfg.num_scales
    seq_len, full_len = slices[num_scales - 1][1], slices[-1][1]
    last_begin, last_end = slices[num_scales - 1]

    def train_step(state: TrainState, batch, frozen):
        ramp = batch.get("loss_ramp", jnp.float32(1.0))
        weights = truncated_weights(full_weights, slices, num_scales - 1, ramp)

        def micro_step(micro, key):
            """Loss, metrics and gradients of one micro-batch (the whole batch when k = 1)."""
            if tokenize is not None:
                tokens, teacher = tokenize(frozen, micro[input_key], jax.random.fold_in(key, FLIP_STREAM))
            else:
                tokens, teacher = micro["tokens"], micro["teacher_input"]
            # the teacher input lacks the start positions (first_l, which depends on the order): cut its tail
            tokens, teacher = tokens[:, :seq_len], teacher[:, :teacher.shape[1] - (full_len - seq_len)]
            cond_key, dropout_key = jax.random.split(key)

            def loss_fn(params):
                model = parts.merge(params)
                logits = model(micro["label"], teacher, cond_drop_key=cond_key, deterministic=False,
                               dropout_key=dropout_key, num_scales=num_scales)
                per_token = var_loss.head_cross_entropy(logits, tokens, step_cfg.label_smoothing, step_cfg.bits)
                return var_loss.weighted_loss(per_token, weights), logits

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            means = {"grads": grads, "loss": loss,
                     **var_loss.var_metrics(logits, tokens, last_end - last_begin, step_cfg.bits)}
            return means, None, None

        inputs = (input_key,) if tokenize is not None else ("tokens", "teacher_input")
        # Per-step randomness from (base key, step): a resumed run draws exactly the same keys.
        means, _, _ = accumulate(micro_step, {k: batch[k] for k in inputs + ("label",)}, step_cfg.grad_accum_steps,
                                 jax.random.fold_in(state.rng, state.step))
        grads, loss = means.pop("grads"), means.pop("loss")
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {**means, "loss": loss, "grad_norm": grad_norm, **current_hyperparams(opt_state)}
        if tokenize is not None and input_key == "image":
            batch = {**batch, "image": to_model_range_on_device(batch["image"])}   # finish_step checks these
        # A non-finite loss or gradient changes nothing but the step (see state.finish_step).
        new_state, counters = finish_step(state, state.replace(step=state.step + 1, params=params,
                                                               opt_state=opt_state), loss, grad_norm, batch)
        return new_state, {**metrics, **counters}

    return train_step
