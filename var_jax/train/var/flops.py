"""Analytic FLOPs of a VAR training step (for throughput / MFU logging and the benchmark).

Counts matrix multiplies only (2 FLOPs per multiply-add), as MFU conventions do; the backward pass costs twice
the forward. Attention counts the dense L×L score and value products, whatever the implementation executes: the
grouped attention (attention_impl 'grouped', CPU) skips most masked score blocks, so its MFU reads a little high;
jax.nn.dot_product_attention with a mask computes them all.
"""
from __future__ import annotations


def var_forward_flops_per_example(cfg, seq_len: int | None = None) -> float:
    """Forward FLOPs of one image through the VAR transformer (VARConfig `cfg`) at sequence length L."""
    L = cfg.seq_len if seq_len is None else seq_len
    C, Cv, H = cfg.width, cfg.z_channels, cfg.mlp_hidden
    V = getattr(cfg, "head_size", cfg.vocab_size)   # outputs per position: V, or 2 per bit for a bitwise head
    adaln = getattr(cfg, "adaln", True)     # the adaln=False ablation has no modulation projections
    per_block = (2 * L * C * 3 * C          # fused q|k|v
                 + 2 * 2 * L * L * C        # q·kᵀ and attention·v over every head
                 + 2 * L * C * C            # output projection
                 + 2 * 2 * L * C * H        # fc1 and fc2
                 + (2 * C * 6 * C if adaln else 0))   # AdaLN modulation (once per image)
    embed = 2 * L * Cv * C
    head = 2 * L * C * V + (2 * C * 2 * C if adaln else 0)
    shared = 2 * C * 6 * C if getattr(cfg, "shared_aln", False) else 0
    return float(cfg.depth * per_block + embed + head + shared)


def var_train_flops_per_example(cfg, seq_len: int | None = None) -> float:
    """Forward + backward (3× forward) FLOPs of one image; the frozen tokenizer is not included."""
    return 3.0 * var_forward_flops_per_example(cfg, seq_len)


def compiled_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled computation (None where the backend does not report it)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])
