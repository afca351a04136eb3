"""The VAR stage's held-out evaluation (train/held_out.py): the paper's test loss L and token error rate Err.

The eval step tokenises the held-out images with the frozen tokenizer as the train step does
(step.make_tokenizer_fn), or builds the teacher input from a held-out token set's ids (step.make_ids_teacher_fn,
`input_key='tokens'`, data.eval_dir: the encoder never runs), runs the transformer with teacher forcing over all
scales (no drop-path; class dropout only with eval_class_dropout, as the reference evaluates) and returns, per
scale, the sums over the batch's real images of the token cross-entropy (loss.token_cross_entropy, no label
smoothing and uniform weights: the paper's L, not the training objective when label smoothing or scale weights
are set) and of the correct top-1 tokens.

Metrics: val/loss, val/acc (all tokens), val/loss_last, val/acc_last (the last scale), val/loss_s{k},
val/acc_s{k} (scale k = 0, 1, ..., the k-th entry of patch_nums); accuracies in % like Accm / Acct (the error
rate is 100 - acc); val/images, the number of held-out images. A bitwise head (`bits` > 0): the loss is the
per-token mean over bits (loss.head_cross_entropy), val/acc* are bit accuracies, and val/token_acc,
val/token_acc_last the share of tokens with every bit right.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.checkpoints import ModelParts
from var_jax.scale_config import scale_begin_ends
from var_jax.train.var import loss as var_loss
from var_jax.transformer import bitwise_head


def make_var_eval_step(parts: ModelParts, patch_nums, tokenize: Callable, *, class_dropout: bool = False,
                       seed: int = 0, input_key: str = "image", bits: int = 0) -> Callable:
    """eval_step(params, batch, frozen) -> {'ce': (S,), 'correct': (S,), 'images': ()} sums over the real
    images (batch 'mask' 1.0; a bitwise head with `bits` bits adds 'token_correct': (S,)). With class_dropout the
    batch's 'index' (its number in the pass) seeds the draw, so every evaluation of the same params drops the
    same labels."""
    slices = scale_begin_ends(tuple(patch_nums))

    def per_scale(x, mask):
        return jnp.stack([jnp.sum(x[:, begin:end] * mask[:, None]) for begin, end in slices])

    def eval_step(params, batch, frozen):
        tokens, teacher = tokenize(frozen, batch[input_key])
        key = jax.random.fold_in(jax.random.PRNGKey(seed), batch["index"]) if class_dropout else None
        # deterministic=False with no dropout_key: class dropout only, never drop-path
        logits = parts.merge(params)(batch["label"], teacher, cond_drop_key=key, deterministic=not class_dropout)
        mask = batch["mask"].astype(jnp.float32)
        sums = {"ce": per_scale(var_loss.head_cross_entropy(logits, tokens, bits=bits), mask),
                "correct": per_scale(var_loss.head_correct(logits, tokens, bits), mask), "images": jnp.sum(mask)}
        if bits:
            exact = (bitwise_head.predicted_ids(logits, bits) == tokens).astype(jnp.float32)
            sums["token_correct"] = per_scale(exact, mask)
        return sums
    return eval_step


def var_val_metrics(sums: dict, patch_nums) -> dict:
    """val/... metrics from the eval step's sums added over the held-out split (float64)."""
    n = float(sums["images"])
    tokens = n * np.array([pn * pn for pn in patch_nums], np.float64)
    loss, acc = sums["ce"] / tokens, 100.0 * sums["correct"] / tokens
    out = {"val/loss": float(np.sum(sums["ce"]) / np.sum(tokens)),
           "val/acc": float(100.0 * np.sum(sums["correct"]) / np.sum(tokens)),
           "val/loss_last": float(loss[-1]), "val/acc_last": float(acc[-1]), "val/images": n}
    for k in range(len(patch_nums)):
        out[f"val/loss_s{k}"], out[f"val/acc_s{k}"] = float(loss[k]), float(acc[k])
    if "token_correct" in sums:
        out["val/token_acc"] = float(100.0 * np.sum(sums["token_correct"]) / np.sum(tokens))
        out["val/token_acc_last"] = float(100.0 * sums["token_correct"][-1] / tokens[-1])
    return out
