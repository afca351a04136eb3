"""Block-sparse attention kernels for the block-causal mask of VAR's full-sequence (teacher-forced) attention.

A query of scale s sees the keys [0, end of scale s): every query row sees a prefix of the keys, and the prefix
never shrinks from one row to the next. Cut into square tiles, the (L, L) mask has three kinds of tile: EMPTY (no
query of the tile sees any of its keys: never computed), FULL (every score kept: no mask applied) and PARTIAL (the
element mask applied). `BlockPlan` holds that table for a sequence padded to a whole number of tiles; padding keys
are seen by no query, padding queries see every real key (their rows are discarded) so that no row is empty.

- `splash_attention` (TPU): jax's splash attention with the padded mask; splash derives its own tile table and
  skips the empty tiles in the forward and both backward kernels.
- `pallas_attention` (GPU): a flash-attention kernel written here with jax.experimental.pallas (online softmax;
  backward in two kernels, dq over key tiles and dk/dv over query tiles, recomputing the probabilities from the
  saved row log-sum-exp). For query tile i the loop over key tiles runs over the FULL tiles [0, kv_full[i]) and
  then the PARTIAL ones [kv_full[i], kv_needed[i]) and stops there.

Both take (q, k, v, groups, scale) like the other attention paths, q/k/v (B, L, H, hd), and cover only the static
mask of the query groups; the KV-cached sampler keeps the existing paths. They are checked against the dense
masked softmax in the Pallas interpreter on CPU (tests/test_block_sparse_attention.py); neither has been compiled
or timed on a TPU or GPU yet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from var_jax.transformer.attention import QueryGroup, dense_mask

EMPTY, FULL, PARTIAL = 0, 1, 2
SPLASH_BLOCK = 128   # TPU tiles: splash needs multiples of the 128 lanes
PALLAS_BLOCK = 64    # GPU tiles: small enough that VAR's small scales leave whole tiles empty (not tuned)
# Finite, so that a tile row whose keys are all masked gives exp(MASK_VALUE - max) = 0 rather than NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# The backend each kernel compiles for (jax.default_backend() names).
KERNEL_BACKENDS = {"splash": "tpu", "pallas": "gpu"}

_interpret = False


@contextlib.contextmanager
def interpret_mode():
    """Inside: the model's 'splash' / 'pallas' attention runs in the Pallas interpreter (CPU tests; slow)."""
    global _interpret
    previous, _interpret = _interpret, True
    try:
        yield
    finally:
        _interpret = previous


# ---- the tile table -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Query row r (of the padded sequence) sees keys [0, row_ends[r]); tiles are block × block. Hashable."""
    length: int                  # L, before padding
    block: int
    row_ends: tuple[int, ...]    # one per padded row

    @property
    def padded(self) -> int:
        return len(self.row_ends)

    @property
    def num_blocks(self) -> int:
        return self.padded // self.block

    def mask(self) -> np.ndarray:
        """The padded (Lp, Lp) bool mask."""
        return np.arange(self.padded)[None, :] < np.asarray(self.row_ends)[:, None]

    def kinds(self) -> np.ndarray:
        """(query tiles, key tiles) table of EMPTY / FULL / PARTIAL."""
        ends = np.asarray(self.row_ends).reshape(self.num_blocks, self.block)
        key_begin = np.arange(self.num_blocks) * self.block
        full = ends.min(1)[:, None] >= key_begin + self.block
        empty = ends.max(1)[:, None] <= key_begin
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)

    def kv_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per query tile: key tiles [0, kv_full) are FULL, [kv_full, kv_needed) PARTIAL, the rest EMPTY."""
        kinds = self.kinds()
        return (kinds == FULL).sum(1).astype(np.int32), (kinds != EMPTY).sum(1).astype(np.int32)

    def q_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per key tile: query tiles [0, q_first) EMPTY, [q_first, q_full) PARTIAL, [q_full, end) FULL."""
        kinds = self.kinds()
        return (kinds == EMPTY).sum(0).astype(np.int32), (kinds != FULL).sum(0).astype(np.int32)


def prefix_row_ends(mask: np.ndarray) -> np.ndarray:
    """Row r of `mask` keeps keys [0, ends[r]); ValueError unless every row is a non-empty prefix, non-shrinking."""
    ends = mask.sum(1)
    if not (mask == (np.arange(mask.shape[1])[None, :] < ends[:, None])).all():
        raise ValueError("block-sparse attention: every query must see a prefix of the keys")
    if ends.min() < 1 or (np.diff(ends) < 0).any():
        raise ValueError("block-sparse attention: every query must see key 0, and a row no fewer keys than the last")
    return ends


def block_plan(groups: tuple[QueryGroup, ...], block: int) -> BlockPlan:
    """The tile table of the query groups' mask, L padded up to a multiple of `block`."""
    ends = prefix_row_ends(dense_mask(groups))
    length = len(ends)
    padded = -(-length // block) * block
    return BlockPlan(length, block, tuple(int(e) for e in ends) + (length,) * (padded - length))


def _check_backend(impl: str, interpret: bool):
    backend, needs = jax.default_backend(), KERNEL_BACKENDS[impl]
    if not interpret and backend != needs:
        raise ValueError(f"attention_impl {impl!r} needs a {needs.upper()} backend, this process runs on "
                         f"{backend!r} (tests: interpret=True / block_sparse.interpret_mode())")


def _pad_seq(x, padded: int):
    """(B, L, H, hd) -> (B, padded, H, hd), zeros after the real tokens."""
    return jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)))


def block_sparse_attention(impl: str, q, k, v, groups: tuple[QueryGroup, ...], scale: float):
    """The model's entry point: 'splash' or 'pallas', interpreted inside `interpret_mode()`."""
    fn = {"splash": splash_attention, "pallas": pallas_attention}[impl]
    return fn(q, k, v, groups, scale, interpret=_interpret)


# ---- splash (TPU) ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _splash_kernel(plan: BlockPlan, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
    head_mask = splash_mask.NumpyMask(plan.mask())
    b = plan.block
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():   # cached across traces: its tile tables must be constants, not tracers
        return splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, groups: tuple[QueryGroup, ...], scale: float, *, interpret: bool = False):
    """Block-causal attention with TPU splash attention: q/k/v (B, L, H, hd) -> (B, L, H, hd)."""
    _check_backend("splash", interpret)
    plan = block_plan(groups, SPLASH_BLOCK)
    kernel = _splash_kernel(plan, q.shape[2], interpret)
    heads_major = lambda x: jnp.swapaxes(_pad_seq(x, plan.padded), 1, 2)   # splash takes (H, L, hd) per example
    if scale != 1.0:   # splash does not scale the scores
        q = (q * scale).astype(q.dtype)
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v))
    return jnp.swapaxes(out, 1, 2)[:, :plan.length]


# ---- Pallas flash attention (GPU) -----------------------------------------------------------------------------
def _scores(q, k, scale: float, row_ends, key_begin, masked: bool):
    """(bq, hd) · (bk, hd)ᵀ · scale in float32; the element mask only on PARTIAL tiles."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
    if scale != 1.0:
        s = s * scale
    if masked:
        keys = key_begin + jnp.arange(k.shape[0])
        s = jnp.where(keys[None, :] < row_ends[:, None], s, MASK_VALUE)
    return s


def _tile_grads(q, k, v, d_out, lse, delta, scale, row_ends, key_begin, masked):
    """Probabilities p and score gradients dS = p ∘ (dO·vᵀ − delta) · scale of one tile."""
    p = jnp.exp(_scores(q, k, scale, row_ends, key_begin, masked) - lse[:, None])
    d_p = jnp.dot(d_out, v.T, preferred_element_type=jnp.float32)
    d_s = p * (d_p - delta[:, None])
    return p, (d_s * scale if scale != 1.0 else d_s)


def _loop_kv(kv_full, kv_needed, body, carry):
    """body(key tile, carry, masked) over the FULL key tiles, then the PARTIAL ones; the EMPTY ones never run."""
    carry = lax.fori_loop(0, kv_full, functools.partial(body, masked=False), carry)
    return lax.fori_loop(kv_full, kv_needed, functools.partial(body, masked=True), carry)


def _forward_kernel(kv_full_ref, kv_needed_ref, row_ends_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *,
                    scale, block):
    q, row_ends = q_ref[...], row_ends_ref[...]

    def body(j, carry, masked):
        acc, row_max, denom = carry
        keys = pl.ds(j * block, block)
        s = _scores(q, k_ref[keys, :], scale, row_ends, j * block, masked)
        new_max = jnp.maximum(row_max, s.max(-1))
        p = jnp.exp(s - new_max[:, None])
        rescale = jnp.exp(row_max - new_max)     # online softmax: earlier tiles were summed against the old max
        v = v_ref[keys, :]
        acc = acc * rescale[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, new_max, denom * rescale + p.sum(-1)

    start = (jnp.zeros(q.shape, jnp.float32), jnp.full((block,), -jnp.inf, jnp.float32),
             jnp.zeros((block,), jnp.float32))
    acc, row_max, denom = _loop_kv(kv_full_ref[0], kv_needed_ref[0], body, start)
    out_ref[...] = (acc / denom[:, None]).astype(out_ref.dtype)
    lse_ref[...] = row_max + jnp.log(denom)


def _dq_kernel(kv_full_ref, kv_needed_ref, row_ends_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref,
               d_q_ref, *, scale, block):
    q, d_out, lse, delta, row_ends = q_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...], row_ends_ref[...]

    def body(j, d_q, masked):
        keys = pl.ds(j * block, block)
        k = k_ref[keys, :]
        _, d_s = _tile_grads(q, k, v_ref[keys, :], d_out, lse, delta, scale, row_ends, j * block, masked)
        return d_q + jnp.dot(d_s.astype(k.dtype), k, preferred_element_type=jnp.float32)

    d_q = _loop_kv(kv_full_ref[0], kv_needed_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    d_q_ref[...] = d_q.astype(d_q_ref.dtype)


def _dkv_kernel(q_first_ref, q_full_ref, row_ends_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref,
                d_k_ref, d_v_ref, *, scale, block, num_blocks):
    k, v = k_ref[...], v_ref[...]
    key_begin = pl.program_id(2) * block

    def body(i, carry, masked):
        d_k, d_v = carry
        rows = pl.ds(i * block, block)
        q, d_out = q_ref[rows, :], d_out_ref[rows, :]
        p, d_s = _tile_grads(q, k, v, d_out, lse_ref[rows], delta_ref[rows], scale, row_ends_ref[rows],
                             key_begin, masked)
        d_v = d_v + jnp.dot(p.astype(d_out.dtype).T, d_out, preferred_element_type=jnp.float32)
        return d_k + jnp.dot(d_s.astype(q.dtype).T, q, preferred_element_type=jnp.float32), d_v

    zeros = jnp.zeros(k.shape, jnp.float32)
    # the query tiles that see this key tile: PARTIAL ones first, then FULL ones to the end of the sequence
    carry = lax.fori_loop(q_first_ref[0], q_full_ref[0], functools.partial(body, masked=True), (zeros, zeros))
    d_k, d_v = lax.fori_loop(q_full_ref[0], num_blocks, functools.partial(body, masked=False), carry)
    d_k_ref[...], d_v_ref[...] = d_k.astype(d_k_ref.dtype), d_v.astype(d_v_ref.dtype)


class _Specs:
    """BlockSpecs over the grid (batch, head, tile) for (B, Lp, H, hd) arrays, (B, H, Lp) row stats and tables."""

    def __init__(self, plan: BlockPlan, head_dim: int):
        b, n = plan.block, plan.padded
        self.tile = pl.BlockSpec((None, b, None, head_dim), lambda bi, h, i: (bi, i, h, 0))
        self.seq = pl.BlockSpec((None, n, None, head_dim), lambda bi, h, i: (bi, 0, h, 0))
        self.row_tile = pl.BlockSpec((None, None, b), lambda bi, h, i: (bi, h, i))
        self.row_seq = pl.BlockSpec((None, None, n), lambda bi, h, i: (bi, h, 0))
        self.ends_tile = pl.BlockSpec((b,), lambda bi, h, i: (i,))
        self.ends_seq = pl.BlockSpec((n,), lambda bi, h, i: (0,))
        self.entry = pl.BlockSpec((1,), lambda bi, h, i: (i,))    # one table entry per tile


def _call(kernel, plan: BlockPlan, q, in_specs, out_specs, out_shape, interpret, name):
    """pallas_call over the grid (batch, head, tile); one program per query tile (dq, forward) or key tile (dk/dv)."""
    B, _, H, _ = q.shape
    return pl.pallas_call(kernel, grid=(B, H, plan.num_blocks), in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, name=name)


def _tables(plan: BlockPlan, bounds):
    """The kernels' first three inputs: the two per-tile loop bounds and the per-row key ends (element mask)."""
    return [jnp.asarray(a) for a in bounds] + [jnp.asarray(np.asarray(plan.row_ends, np.int32))]


def _flash_forward(q, k, v, plan: BlockPlan, scale: float, interpret: bool):
    """Padded q/k/v (B, Lp, H, hd) -> out (B, Lp, H, hd), row log-sum-exp (B, H, Lp) float32."""
    B, n, H, hd = q.shape
    specs = _Specs(plan, hd)
    kernel = functools.partial(_forward_kernel, scale=scale, block=plan.block)
    return _call(kernel, plan, q,
                 [specs.entry, specs.entry, specs.ends_tile, specs.tile, specs.seq, specs.seq],
                 [specs.tile, specs.row_tile],
                 [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, n), jnp.float32)],
                 interpret, "block_sparse_forward")(*_tables(plan, plan.kv_bounds()), q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, plan: BlockPlan, scale: float, interpret: bool):
    return _flash_forward(q, k, v, plan, scale, interpret)[0]


def _flash_fwd(q, k, v, plan, scale, interpret):
    out, lse = _flash_forward(q, k, v, plan, scale, interpret)
    return out, (q, k, v, out, lse)


def _flash_bwd(plan, scale, interpret, residuals, d_out):
    q, k, v, out, lse = residuals
    specs = _Specs(plan, q.shape[-1])
    # rowsum(dO ∘ O) of the softmax backward, (B, H, Lp)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out, preferred_element_type=jnp.float32)
    inputs = (q, k, v, d_out, lse, delta)
    dq_kernel = functools.partial(_dq_kernel, scale=scale, block=plan.block)
    d_q = _call(dq_kernel, plan, q,
                [specs.entry, specs.entry, specs.ends_tile, specs.tile, specs.seq, specs.seq, specs.tile,
                 specs.row_tile, specs.row_tile],
                specs.tile, jax.ShapeDtypeStruct(q.shape, q.dtype), interpret,
                "block_sparse_dq")(*_tables(plan, plan.kv_bounds()), *inputs)
    dkv_kernel = functools.partial(_dkv_kernel, scale=scale, block=plan.block, num_blocks=plan.num_blocks)
    d_k, d_v = _call(dkv_kernel, plan, q,
                     [specs.entry, specs.entry, specs.ends_seq, specs.seq, specs.tile, specs.tile, specs.seq,
                      specs.row_seq, specs.row_seq],
                     [specs.tile, specs.tile],
                     [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], interpret,
                     "block_sparse_dkv")(*_tables(plan, plan.q_bounds()), *inputs)
    return d_q, d_k, d_v


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q, k, v, groups: tuple[QueryGroup, ...], scale: float, *, interpret: bool = False,
                     block: int = PALLAS_BLOCK):
    """Block-causal attention with the Pallas flash-attention kernel: q/k/v (B, L, H, hd) -> (B, L, H, hd)."""
    _check_backend("pallas", interpret)
    hd = q.shape[-1]
    if hd < 16 or hd & (hd - 1):
        raise ValueError(f"attention_impl 'pallas': head_dim must be a power of two >= 16 (GPU tiles), got {hd}")
    plan = block_plan(groups, block)
    pad = lambda x: _pad_seq(x, plan.padded)
    return _flash(pad(q), pad(k), pad(v), plan, float(scale), interpret)[:, :plan.length]
