"""VAR: the class-conditional next-scale-prediction transformer (VAR_REFERENCE §2).

The `depth` blocks are stored stacked (leading `layers` axis) and run with one `jax.lax.scan` over the split
block state: one compiled block whatever the depth. Two ways through the blocks share that code:
- `__call__`: teacher forcing over the whole (or a prefix of the) sequence with the block-causal mask;
- `forward_cached`: one scale at a time against a KV cache, for sampling (the pieces the sampler composes are
  `cond_embedding`, `first_scale_input`, `scale_input`, `init_cache`, `forward_cached`).

Ablations (VARConfig): `adaln=False` keeps the class only in the start token (plain affine LayerNorms);
`order='raster'` is the next-token baseline over one token map: position 0 is the start token, position t>0 reads
the code vector of token t-1 (`token_input`), and the mask is token-causal.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.sharding import constrain
from var_jax.transformer.attention import block_causal_groups, token_causal_groups
from var_jax.transformer.blocks import (AdaLNBeforeHead, AdaLNSelfAttn, AffineLayerNorm, compute_dtype, linear,
                                        trunc_normal)
from var_jax.transformer.config import VARConfig


# logical axes of the (B, l, C) residual stream (see var_jax/sharding.py)
ACTIVATION_AXES = ("batch", "seq", None)


def block_causal_mask(scale_ids) -> np.ndarray:
    """(L, L) bool: a query of scale a sees a key of scale b iff b <= a. Built at trace time, never stored."""
    ids = np.asarray(scale_ids)
    return ids[None, :] <= ids[:, None]


class VAR(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        C, L = cfg.width, cfg.seq_len
        self.word_embed = linear(cfg, cfg.z_channels, C, ("cvae", "embed"), rngs=rngs)
        # class index num_classes is the unconditional class (class dropout, CFG)
        self.class_emb = nnx.Embed(cfg.num_classes + 1, C, dtype=jnp.float32, rngs=rngs, embedding_init=
                                   nnx.with_partitioning(trunc_normal(cfg.init_std), ("classes", "embed")))
        # the reference draws the position embeddings with sqrt(1/(3C)) whatever init_std is
        pos_std = math.sqrt(1.0 / (3 * C))
        self.pos_start = nnx.Param(trunc_normal(pos_std)(rngs.params(), (1, cfg.first_l, C)),
                                   out_sharding=(None, "seq", "embed"))
        self.pos_1LC = nnx.Param(trunc_normal(pos_std)(rngs.params(), (1, L, C)), out_sharding=(None, "seq", "embed"))
        # one embedding per scale ("level"), added to every token of that scale; the scale axis is seq-like
        self.lvl_embed = nnx.Embed(cfg.num_scales, C, dtype=jnp.float32, rngs=rngs, embedding_init=
                                   nnx.with_partitioning(trunc_normal(cfg.init_std), ("seq", "embed")))
        if cfg.shared_aln:
            self.shared_ada_lin = linear(cfg, C, 6 * C, ("embed", "ada"), rngs=rngs)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.head_nm = AdaLNBeforeHead(cfg, rngs=rngs) if cfg.adaln else AffineLayerNorm(cfg)
        self.head = linear(cfg, C, cfg.head_size, ("embed", "vocab"), rngs=rngs,   # V, or 2 per bit (bitwise)
                           factor=cfg.init_head if cfg.init_head >= 0 else 1.0)

    # ---- embeddings ------------------------------------------------------------------------------------------
    def cond_embedding(self, labels):
        """labels (B,) int (num_classes = unconditional) -> class embedding (B, C) float32."""
        return self.class_emb(jnp.asarray(labels, jnp.int32))

    def _level_position(self, begin: int, end: int):
        """lvl_embed(scale id) + pos_1LC for sequence positions [begin, end): (1, end-begin, C)."""
        ids = np.asarray(self.cfg.scale_ids[begin:end], np.int32)
        return self.lvl_embed(jnp.asarray(ids))[None] + self.pos_1LC[:, begin:end]

    def first_scale_input(self, cond):
        """Class embedding + pos_start + level/position of scale 0: (B, first_l, C)."""
        first_l = self.cfg.first_l
        return cond[:, None, :] + self.pos_start[...] + self._level_position(0, first_l)

    def scale_input(self, si: int, x_in):
        """Tokenizer features of scale si's input block (B, pn_si², Cvae) -> (B, pn_si², C); si is a static int."""
        if not 1 <= si < self.cfg.num_scales:
            raise ValueError(f"scale_input: si must be in [1, {self.cfg.num_scales - 1}] (scale 0 is "
                             f"first_scale_input), got {si}")
        begin, end = self.cfg.scale_begin_ends[si]
        if x_in.ndim != 3 or x_in.shape[1:] != (end - begin, self.cfg.z_channels):
            raise ValueError(f"scale_input: x_in must be (B, {end - begin}, {self.cfg.z_channels}) for scale {si}, "
                             f"got {tuple(x_in.shape)}")
        return self.word_embed(x_in.astype(jnp.float32)).astype(jnp.float32) + self._level_position(begin, end)

    def token_input(self, position, codes):
        """Raster order: codebook vectors (B, 1, Cvae) of the token at `position`-1 -> the transformer input at
        `position` (B, 1, C); position may be traced (the sampler's loop index)."""
        pos = jax.lax.dynamic_slice_in_dim(self.pos_1LC[...], position, 1, axis=1)
        level = self.lvl_embed(jnp.zeros((1,), jnp.int32))[None]   # one scale: the same level everywhere
        return self.word_embed(codes.astype(jnp.float32)).astype(jnp.float32) + level + pos

    def _block_cond(self, cond):
        """What each block's AdaLN reads: the class embedding, or the shared 6C projection of it; None without
        AdaLN (the class then enters only through the start token)."""
        if not self.cfg.adaln:
            return None
        if self.cfg.shared_aln:
            return self.shared_ada_lin(jax.nn.silu(cond))
        return cond

    def logits(self, x, cond):
        """AdaLN head (affine LayerNorm without AdaLN) + output projection: (B, l, C) -> (B, l, V) float32."""
        h = self.head_nm(x, cond.astype(x.dtype)) if self.cfg.adaln else self.head_nm(x)
        logits = self.head(h).astype(jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))

    # ---- the blocks ------------------------------------------------------------------------------------------
    def _run_blocks(self, x, cond, make_kv_fn, cache=None, dropout_key=None):
        """Scan x through the stacked blocks. make_kv_fn(cache, layer) -> kv_fn for AdaLNSelfAttn, whose aux is
        the updated cache. The stacked cache rides in the scan's carry (not its xs/ys), so XLA updates it in
        place: as xs/ys every call would write a fresh copy (340 MiB per k or v for d16 at batch 8).
        dropout_key enables drop-path (rates linear over depth). Returns (x, cache)."""
        cfg = self.cfg
        graphdef, block_state = nnx.split(self.blocks)
        block_cond = self._block_cond(cond)
        block_cond = None if block_cond is None else block_cond.astype(x.dtype)
        rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth).astype(np.float32)
        use_drop = dropout_key is not None and cfg.drop_path_rate > 0
        keys = jax.random.split(dropout_key, cfg.depth) if use_drop else None

        def body(carry, layer):
            x, cache = carry
            state, index, rate, key = layer
            block = nnx.merge(graphdef, state)
            drop_scales = None
            if key is not None:
                keep = 1.0 - rate
                masks = jax.random.bernoulli(key, keep, (2, x.shape[0], 1, 1))
                drop_scales = (masks / keep).astype(x.dtype)  # stochastic depth, rescaled by 1/keep
            x, cache = block(x, block_cond, make_kv_fn(cache, index), drop_scales)
            # activations: batch over the data-parallel axes; the width stays whole (its mesh axis holds weights)
            return (constrain(x, ACTIVATION_AXES), cache), None

        if cfg.remat == "block":
            body = jax.checkpoint(body, prevent_cse=False)
        layers = (block_state, jnp.arange(cfg.depth, dtype=jnp.int32), jnp.asarray(rates), keys)
        return jax.lax.scan(body, (x, cache), layers)[0]

    def __call__(self, labels, teacher_input, *, cond_drop_key=None, deterministic=True, dropout_key=None,
                 num_scales=None):
        """Teacher forcing. labels (B,), teacher_input (B, L-first_l, Cvae) (or already cut to the first
        num_scales scales) -> logits (B, L', V) float32, L' the length of the first num_scales scales.
        Class dropout (cfg.cond_drop_rate) needs cond_drop_key and deterministic=False; drop-path needs
        dropout_key and deterministic=False."""
        cfg = self.cfg
        end = cfg.prefix_len(cfg.num_scales if num_scales is None else num_scales)
        labels = jnp.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be (B,), got shape {tuple(labels.shape)}")
        B, n_in = labels.shape[0], end - cfg.first_l
        if (teacher_input.ndim != 3 or teacher_input.shape[0] != B or teacher_input.shape[2] != cfg.z_channels
                or teacher_input.shape[1] not in (n_in, cfg.seq_len - cfg.first_l)):
            raise ValueError(f"teacher_input must be ({B}, {cfg.seq_len - cfg.first_l} or {n_in}, "
                             f"{cfg.z_channels}), got {tuple(teacher_input.shape)}")
        if cond_drop_key is not None and not deterministic and cfg.cond_drop_rate > 0:
            dropped = jax.random.uniform(cond_drop_key, (B,)) < cfg.cond_drop_rate
            labels = jnp.where(dropped, cfg.num_classes, labels)
        cond = self.cond_embedding(labels)
        words = self.word_embed(teacher_input[:, :n_in].astype(jnp.float32)).astype(jnp.float32)
        x = jnp.concatenate([self.first_scale_input(cond), words + self._level_position(cfg.first_l, end)], axis=1)
        x = constrain(x.astype(compute_dtype(cfg)), ACTIVATION_AXES)

        if cfg.order == "raster":
            groups = token_causal_groups(end)
        else:
            groups = block_causal_groups(cfg.patch_nums[:cfg.scale_ids[end - 1] + 1])
        make_kv_fn = lambda cache, layer: (lambda k, v: (k, v, groups, cache))
        x, _ = self._run_blocks(x, cond, make_kv_fn, dropout_key=None if deterministic else dropout_key)
        return self.logits(x, cond)

    # ---- KV-cached inference ---------------------------------------------------------------------------------
    def init_cache(self, batch: int, dtype=None, length: int | None = None):
        """Zeroed KV cache: {'k', 'v'}, each (layers, B, length, H, head_dim); length defaults to the whole sequence
        L. A sampler that runs its last scale as a static block needs only the positions before it (see
        forward_cached): for d16 at 256 px that is 424 of 680 positions."""
        cfg = self.cfg
        length = cfg.seq_len if length is None else int(length)
        if not 1 <= length <= cfg.seq_len:
            raise ValueError(f"init_cache: length must be in [1, {cfg.seq_len}], got {length}")
        shape = (cfg.depth, batch, length, cfg.heads, cfg.head_dim)
        dtype = compute_dtype(cfg) if dtype is None else dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def forward_cached(self, x, cond, cache, start, kv_len=None, valid_len=None, key_mask=None):
        """Run the block input x (B, l, C) of the sequence positions [start, start+l) against the KV cache.

        Writes this block's keys/values into the cache and attends to cache positions [0, start+valid_len) with no
        mask (valid_len defaults to l; a smaller one lets x carry padding rows after its real tokens: they are
        written to the cache, where the next block overwrites them, but never attended to).
        `start` a Python int: the cache is sliced statically to exactly start+valid_len (exact work; valid_len
        must then be an int too). `start` traced: attention runs over a static `kv_len` (default L) positions
        with a mask of positions < start+valid_len (valid_len may be traced).
        A static block that starts where a shorter cache ends (start == cache length) is not stored: it attends
        to the cache's positions and then to its own keys, the same values a cache read would give, and the
        cache comes back unchanged. That lets the last scale, which no later block reads, skip the cache.
        key_mask (traced start only): a (kv_len,) bool mask of the keys the block may see besides that bound (a KV
        window, var_jax/sample/accelerate.py).
        cond is the class embedding (B, C). Returns (logits (B, l, V) float32, updated cache)."""
        cfg = self.cfg
        if x.ndim != 3 or x.shape[2] != cfg.width:
            raise ValueError(f"forward_cached: x must be (B, l, {cfg.width}), got {tuple(x.shape)}")
        l, cache_len = x.shape[1], cache["k"].shape[2]
        valid_len = l if valid_len is None else valid_len
        static = isinstance(start, (int, np.integer))
        if static:
            if not isinstance(valid_len, (int, np.integer)) or not 1 <= valid_len <= l:
                raise ValueError(f"forward_cached: with a static start, valid_len must be an int in [1, {l}], "
                                 f"got {valid_len!r}")
            if start < 0 or start + l > cfg.seq_len:
                raise ValueError(f"forward_cached: positions [{start}, {start + l}) outside [0, {cfg.seq_len})")
            if start + l > cache_len and start != cache_len:
                raise ValueError(f"forward_cached: positions [{start}, {start + l}) neither fit the cache of "
                                 f"{cache_len} positions nor start where it ends")
            stop, mask = int(start) + int(valid_len), None
        else:
            kv_len = cache_len if kv_len is None else int(kv_len)
            if not l <= kv_len <= cache_len:
                raise ValueError(f"forward_cached: kv_len must be in [{l}, {cache_len}], got {kv_len}")
            stop = kv_len
            mask = jnp.arange(kv_len) < start + valid_len
            mask = (mask if key_mask is None else mask & key_mask)[None, None, None, :]
        start_index = jnp.asarray(start, jnp.int32)

        def make_kv_fn(cache, layer):
            def first_rows(stacked, rows):   # this layer's first `rows` positions of a stacked cache array
                return jax.lax.dynamic_slice(stacked, (layer, 0, 0, 0, 0), (1, *stacked.shape[1:2], rows,
                                                                           *stacked.shape[3:]))[0]

            def kv_fn(k, v):
                block = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
                if static and start == cache_len:   # not stored: the cached positions, then the block itself
                    keys, values = (jnp.concatenate([first_rows(cache[name], start), block[name][:, :valid_len]],
                                                    axis=1) for name in ("k", "v"))
                    return keys, values, mask, cache
                # write this block into the layer's rows of the stacked cache, read the layer's first `stop` rows
                new = {name: jax.lax.dynamic_update_slice(cache[name], block[name][None], (layer, 0, start_index, 0, 0))
                       for name in block}
                if static and start == 0:   # nothing cached yet: attend to the block itself, as the cache holds it
                    # (re-reading the just-written cache made XLA copy the whole stacked cache)
                    return block["k"][:, :stop], block["v"][:, :stop], mask, new
                return first_rows(new["k"], stop), first_rows(new["v"], stop), mask, new
            return kv_fn

        x, cache = self._run_blocks(x.astype(compute_dtype(cfg)), cond, make_kv_fn, cache=cache)
        return self.logits(x, cond), cache

    def forward_layers(self, x, cond, carry, layer_fn):
        """x (B, l, C) through the blocks under a caller's layer step, for samplers that change which keys a block
        sees or which tokens it computes (var_jax/sample/accelerated_forward.py). layer_fn(block, x, block_cond,
        carry, layer) -> (x, carry, per-layer output or None), `layer` traced; carry rides in the scan's carry (a KV
        cache there is updated in place). Returns (logits (B, l, V) float32, carry, stacked per-layer outputs)."""
        graphdef, block_state = nnx.split(self.blocks)
        x = x.astype(compute_dtype(self.cfg))
        block_cond = self._block_cond(cond)
        block_cond = None if block_cond is None else block_cond.astype(x.dtype)

        def body(scan_carry, layer):
            x, carry = scan_carry
            state, index = layer
            x, carry, out = layer_fn(nnx.merge(graphdef, state), x, block_cond, carry, index)
            return (constrain(x, ACTIVATION_AXES), carry), out

        layers = (block_state, jnp.arange(self.cfg.depth, dtype=jnp.int32))
        (x, carry), outs = jax.lax.scan(body, (x, carry), layers)
        return self.logits(x, cond), carry, outs

    def num_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(self, nnx.Param)))


def _stacked_blocks(cfg: VARConfig, rngs: nnx.Rngs) -> AdaLNSelfAttn:
    """`depth` blocks with independent initial weights, stacked on a leading `layers` axis."""
    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return AdaLNSelfAttn(cfg, rngs=rngs)
    return create(rngs)
