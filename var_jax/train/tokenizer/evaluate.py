"""The tokenizer stage's held-out evaluation (train/held_out.py): reconstruction loss, PSNR and code usage.

The eval step encodes, quantizes (quantizer.quantize_for_training, whose decoder input equals the cumulative
f_hat) and decodes the held-out images as the train step does, and returns sums over the batch's real images
(batch 'mask' 1.0) of the per-image reconstruction loss (losses.reconstruction_loss of loss.recon_kind, on the
unclamped decoder output like the training `recon`), of the per-image PSNR (losses.psnr, clamped output like the
training `psnr`) and the per-scale code counts.

Metrics: val/rec_loss, val/psnr (dB), val/code_usage (% of the codebook that some held-out image uses at least
once, mean over scales; the training `code_usage` is the reference's EMA-based usage instead), val/code_usage_{pn}
per scale, val/images. BSQ (tokenizer/bsq.py): the counts are each bit's ones per scale; val/code_usage is the % of
bits whose rarer value takes at least bsq.BIT_USAGE_MARGIN of the held-out positions (mean over scales), and
val/bit_ones_{j} the % of held-out positions where bit j is 1 (mean over scales).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.data.transforms import to_model_range_on_device
from var_jax.tokenizer import bsq, quantizer
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.train.tokenizer import losses


def make_tokenizer_eval_step(merge: Callable[[Any], Any], cfg: TokenizerConfig, recon_kind: str) -> Callable:
    """eval_step(params, batch, frozen) -> {'rec_loss': (), 'psnr': (), 'hits': (S, V), 'images': ()} sums."""

    def eval_step(params, batch, frozen):
        del frozen   # LPIPS is not evaluated on the held-out split
        generator = merge(params).generator
        images = to_model_range_on_device(batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        f_hat, _, tokens, _ = quantizer.quantize_for_training(generator.quantizer_params(), generator.encode(images),
                                                              cfg)
        rec = generator.decoder(generator.post_quant_conv(f_hat))
        rec_loss = jax.vmap(lambda x, y: losses.reconstruction_loss(x, y, recon_kind))(images, rec)
        psnr = jax.vmap(lambda x, y: losses.psnr(x[None], y[None]))(images, jnp.clip(rec, -1.0, 1.0))
        if cfg.quantizer == "bsq":
            hits = jnp.stack([jnp.einsum("b,bld->d", mask, bsq.ids_to_bits(t, cfg.bits).astype(jnp.float32))
                              for t in tokens])
        else:
            hits = jnp.stack([jnp.zeros(cfg.vocab_size, jnp.float32).at[t].add(
                jnp.broadcast_to(mask[:, None], t.shape)) for t in tokens])
        return {"rec_loss": jnp.sum(rec_loss * mask), "psnr": jnp.sum(psnr * mask), "hits": hits,
                "images": jnp.sum(mask)}
    return eval_step


def tokenizer_val_metrics(sums: dict, cfg: TokenizerConfig) -> dict:
    """val/... metrics from the eval step's sums added over the held-out split (float64)."""
    n = float(sums["images"])
    hits = np.asarray(sums["hits"], np.float64)
    out = {"val/rec_loss": float(sums["rec_loss"] / n), "val/psnr": float(sums["psnr"] / n), "val/images": n}
    if cfg.quantizer == "bsq":
        ones = hits / (n * np.array([pn * pn for pn in cfg.patch_nums], np.float64))[:, None]
        usage = 100.0 * np.mean(np.minimum(ones, 1.0 - ones) >= bsq.BIT_USAGE_MARGIN, axis=1)
        out.update({f"val/bit_ones_{j}": float(100.0 * share) for j, share in enumerate(np.mean(ones, axis=0))})
    else:
        usage = 100.0 * np.mean(hits > 0, axis=1)
    out["val/code_usage"] = float(np.mean(usage))
    out.update({f"val/code_usage_{pn}": float(usage[si]) for si, pn in enumerate(cfg.patch_nums)})
    return out
