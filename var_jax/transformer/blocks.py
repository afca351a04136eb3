"""The pieces of the VAR transformer: AdaLN self-attention block and the AdaLN head.

Parameters are float32 and carry logical axis names (var_jax/sharding.py); matmuls run in the config's compute
dtype. Initialisers reproduce the reference `VAR.init_weights` with its training arguments (see VAR_REFERENCE §2):
trunc-normal(init_std) weights, zero biases, and the per-parameter rescalings applied as factors at creation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.sharding import constrain
from var_jax.transformer.attention import QueryGroup, attention, dense_mask, grouped_attention
from var_jax.transformer.block_sparse import KERNEL_BACKENDS, block_sparse_attention
from var_jax.transformer.config import VARConfig

# scale_mul is clamped at ln(100) before exp(): the attention temperature of the L2-normalised q/k never exceeds 100.
MAX_LOG_SCALE_MUL = math.log(100.0)
# scale_mul starts at ln(4): a temperature of 4 on cosine similarities.
INIT_LOG_SCALE_MUL = math.log(4.0)
# Without L2-normalised q/k the reference uses a softmax scale of 0.25/sqrt(head_dim), not 1/sqrt(head_dim).
PLAIN_ATTN_SCALE_FACTOR = 0.25
# F.normalize's eps: |x| is clamped from below before dividing.
L2_NORM_EPS = 1e-12
# ada_lin output chunks, in the reference order; the first two are the residual gates.
ADA_CHUNKS = ("gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2")
NUM_GATES = 2


def compute_dtype(cfg: VARConfig):
    return jnp.dtype(cfg.compute_dtype)


# torch.nn.init.trunc_normal_ cuts at ±2 in absolute units (not ±2σ): with the small stds used here it is
# practically N(0, std²). jax.nn.initializers.truncated_normal cuts at ±2σ (std 0.88σ), so it is not used.
TRUNC_BOUND = 2.0


def trunc_normal(std: float, factor=1.0):
    """torch-style trunc_normal_(std, a=-2, b=2) times `factor` (a scalar, or an array broadcast against the
    last axis: one factor per output unit)."""
    def init(key, shape, dtype=jnp.float32):
        bound = TRUNC_BOUND / std
        draw = jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32) * std
        return (draw * jnp.asarray(factor, jnp.float32)).astype(dtype)
    return init


def linear(cfg: VARConfig, d_in: int, d_out: int, names: tuple[str, str], *, rngs: nnx.Rngs,
           factor=1.0, use_bias: bool = True) -> nnx.Linear:
    """A Linear with the reference init (trunc-normal weight × factor, zero bias) and logical axis names."""
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(trunc_normal(cfg.init_std, factor), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


def adaln_factors(cfg: VARConfig) -> np.ndarray:
    """Per-output-unit init factor of a 6C modulation: gates × init_adaln_gamma, scales and shifts × init_adaln."""
    C = cfg.width
    return np.concatenate([np.full(NUM_GATES * C, cfg.init_adaln_gamma),
                           np.full((len(ADA_CHUNKS) - NUM_GATES) * C, cfg.init_adaln)]).astype(np.float32)


def layer_norm(x, eps: float):
    """LayerNorm without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def l2_normalize(x):
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, L2_NORM_EPS)).astype(x.dtype)


class SelfAttention(nnx.Module):
    """Fused-qkv multi-head attention (q and v biases learned, k bias zero), optionally with L2-normalised q/k."""

    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        C, H = cfg.width, cfg.heads
        self.heads, self.head_dim, self.l2_norm = H, cfg.head_dim, cfg.attn_l2_norm
        self.dtype, self.impl = compute_dtype(cfg), cfg.attention_impl
        self.mat_qkv = linear(cfg, C, 3 * C, ("embed", "qkv"), rngs=rngs, use_bias=False)
        self.q_bias = nnx.Param(jnp.zeros((C,), jnp.float32), out_sharding=("qkv",))
        self.v_bias = nnx.Param(jnp.zeros((C,), jnp.float32), out_sharding=("qkv",))
        if cfg.attn_l2_norm:
            self.scale_mul = nnx.Param(jnp.full((H,), INIT_LOG_SCALE_MUL, jnp.float32), out_sharding=("heads",))
        self.proj = linear(cfg, C, C, ("heads", "embed"), rngs=rngs, factor=1 / math.sqrt(2 * cfg.depth))

    def qkv(self, h):
        """(B, l, C) -> q, k, v, each (B, l, H, head_dim); q/k already normalised and temperature-scaled."""
        B, l, C = h.shape
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
        qkv = (self.mat_qkv(h) + bias.astype(self.dtype)).reshape(B, l, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.l2_norm:
            temperature = jnp.exp(jnp.minimum(self.scale_mul[...], MAX_LOG_SCALE_MUL))
            q = (l2_normalize(q).astype(jnp.float32) * temperature[:, None]).astype(self.dtype)
            k = l2_normalize(k)
        heads_axes = ("batch", "seq", "heads", None)   # tensor parallelism splits the heads
        return constrain(q, heads_axes), constrain(k, heads_axes), constrain(v, heads_axes)

    def attend(self, q, k, v, mask=None):
        """Attention of q (B, l, H, hd) over k/v (B, S, H, hd). mask: None (every key visible), a bool array
        broadcastable to (B, H, l, S) (True = keep), or a tuple of QueryGroup (block-causal self-attention)."""
        scale = 1.0 if self.l2_norm else PLAIN_ATTN_SCALE_FACTOR / math.sqrt(self.head_dim)
        out = self._attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale)
        B, l = q.shape[:2]
        return self.proj(out.reshape(B, l, self.heads * self.head_dim))

    def _attention(self, q, k, v, mask, scale):
        """-> (B, l, H, hd) by the implementation `self.impl` names (ATTENTION_IMPLS)."""
        groups = isinstance(mask, tuple) and all(isinstance(g, QueryGroup) for g in mask)
        impl = self.impl
        if impl in KERNEL_BACKENDS:
            if groups:
                return block_sparse_attention(impl, q, k, v, mask, scale)
            impl = "auto"   # the block-sparse kernels cover the static block-causal mask only, not KV-cache steps
        if impl == "auto":
            impl = "grouped" if jax.default_backend() == "cpu" else None
        if impl != "grouped":
            mask = jnp.asarray(dense_mask(mask)) if groups else mask
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
        return grouped_attention(q, k, v, mask, scale) if groups else attention(q, k, v, mask, scale)


class FFN(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        self.fc1 = linear(cfg, cfg.width, cfg.mlp_hidden, ("embed", "mlp"), rngs=rngs)
        self.fc2 = linear(cfg, cfg.mlp_hidden, cfg.width, ("mlp", "embed"), rngs=rngs,
                          factor=1 / math.sqrt(2 * cfg.depth))

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class AffineLayerNorm(nnx.Module):
    """LayerNorm with learnable scale (init 1) and bias (init 0): the norm of the adaln=False ablation."""

    def __init__(self, cfg: VARConfig):
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((cfg.width,), jnp.float32), out_sharding=("embed",))
        self.bias = nnx.Param(jnp.zeros((cfg.width,), jnp.float32), out_sharding=("embed",))

    def __call__(self, x):
        return layer_norm(x, self.eps) * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class AdaLNSelfAttn(nnx.Module):
    """x += attn(LN(x)·(1+scale1)+shift1)·gamma1;  x += ffn(LN(x)·(1+scale2)+shift2)·gamma2.

    The modulation comes from the class embedding: a per-block `ada_lin` (SiLU → Linear(C, 6C)), or, with
    shared AdaLN, the model's shared projection plus this block's learned offset `ada_gss` (6C,).
    With adaln=False (ablation): x += attn(norm1(x)); x += ffn(norm2(x)), affine LayerNorms, no class input."""

    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        C = cfg.width
        self.width, self.eps, self.shared_aln, self.adaln = C, cfg.norm_eps, cfg.shared_aln, cfg.adaln
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.ffn = FFN(cfg, rngs=rngs)
        if not cfg.adaln:
            self.norm1, self.norm2 = AffineLayerNorm(cfg), AffineLayerNorm(cfg)
        elif cfg.shared_aln:
            # reference: randn(1,1,6,C)/sqrt(C), then the same gate / scale-shift factors as ada_lin
            gss = jax.random.normal(rngs.params(), (6 * C,), jnp.float32) / math.sqrt(C) * adaln_factors(cfg)
            self.ada_gss = nnx.Param(gss, out_sharding=("ada",))
        else:
            self.ada_lin = linear(cfg, C, 6 * C, ("embed", "ada"), rngs=rngs, factor=adaln_factors(cfg))

    def modulation(self, block_cond):
        """block_cond: the class embedding (B, C), or the shared projection (B, 6C) with shared AdaLN.
        Returns the six (B, 1, C) chunks in ADA_CHUNKS order."""
        if self.shared_aln:
            mod = self.ada_gss[...] + block_cond
        else:
            mod = self.ada_lin(jax.nn.silu(block_cond))
        mod = mod.reshape(mod.shape[0], 1, len(ADA_CHUNKS), self.width)
        return [mod[:, :, i] for i in range(len(ADA_CHUNKS))]

    def _norms(self, x, block_cond):
        """(norm1, norm2, gate1, gate2): the two pre-branch norms as functions of x and the branch gates (None
        without AdaLN: plain pre-norm residual branches)."""
        if not self.adaln:
            return self.norm1, self.norm2, None, None
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (m.astype(x.dtype) for m in self.modulation(block_cond))
        return (lambda y: layer_norm(y, self.eps) * (1 + scale1) + shift1,
                lambda y: layer_norm(y, self.eps) * (1 + scale2) + shift2, gamma1, gamma2)

    def __call__(self, x, block_cond, kv_fn, drop_scales=None):
        """x (B, l, C) -> (x, aux). kv_fn(k, v) -> (keys, values, mask, aux) decides what the queries attend to
        (the same tokens with the block-causal mask, or a KV cache). drop_scales: optional pair of (B, 1, 1)
        per-sample drop-path multipliers, one per residual branch. block_cond is ignored without AdaLN."""
        norm1, norm2, gate1, gate2 = self._norms(x, block_cond)
        q, k, v = self.attn.qkv(norm1(x))
        keys, values, mask, aux = kv_fn(k, v)
        branch = self.attn.attend(q, keys, values, mask)
        branch = branch if gate1 is None else branch * gate1
        x = x + (branch if drop_scales is None else branch * drop_scales[0])
        branch = self.ffn(norm2(x))
        branch = branch if gate2 is None else branch * gate2
        x = x + (branch if drop_scales is None else branch * drop_scales[1])
        return x, aux


class AdaLNBeforeHead(nnx.Module):
    """LN(x)·(1+scale)+shift with (scale, shift) = Linear(SiLU(class embedding)), before the output head."""

    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        self.width, self.eps = cfg.width, cfg.norm_eps
        self.ada_lin = linear(cfg, cfg.width, 2 * cfg.width, ("embed", "ada"), rngs=rngs, factor=cfg.init_adaln)

    def __call__(self, x, cond):
        mod = self.ada_lin(jax.nn.silu(cond)).reshape(cond.shape[0], 1, 2, self.width).astype(x.dtype)
        return layer_norm(x, self.eps) * (1 + mod[:, :, 0]) + mod[:, :, 1]
