"""The scale-by-scale VAR sampler (the reference's `autoregressive_infer_cfg`, VAR_REFERENCE.md §3) as one jitted
pure function of (transformer state, tokenizer state, labels, image ids, seed) -> (images in [0, 1], tokens).

Per scale: run the transformer on the scale's input block against the KV cache, mix the guided logits, filter
them (top-k, top-p), draw a token per position, optionally overwrite kept positions with the source image's
tokens (editing), add the scale's embedding map to f_hat and build the next scale's input. The scales are walked
according to a plan (schedule.py): unrolled (exact shapes), fully scanned (padded), or grouped (small scales
scanned, large ones unrolled).

Guidance doubles the batch as (conditional, unconditional) row *pairs*: row 2i is image i with its class, row
2i+1 the same image with the null class. Keeping an image's two rows adjacent keeps them on the same device when
the batch is sharded, so the guidance mix needs no communication; rows are computed independently, so the order
does not change any value.

Randomness: image i draws from fold_in(key(seed), image_ids[i]), then fold_in(·, scale): the same seed and image id
give the same image whatever the batch size, batch position or number of devices.

Raster order (the AR baseline, VARConfig.order='raster') dispatches to `_raster_tokens`: token by token in one
lax.scan, with the same guidance (ramped over the token index) and filtering.

Sampling accelerators (SampleOptions.accel, all off by default; accelerate.py): a guidance stop scale, a refiner
model for the late scales, cached token pruning, a KV window. The walker's hooks for them are in
accelerated_walk.py; with them off the walk is the plain one, bit for bit.

A bitwise head (VARConfig.head='bitwise', over a BSQ tokenizer) draws every bit on its own (sample/bitwise.py);
tokens are the packed bits and h their ±1/√d codes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.sample.bitwise import draw_bits
from var_jax.sample.accelerate import Accelerators, check_refiner, phases, plan_cuts, unrolled_from
from var_jax.sample.accelerated_walk import AcceleratedWalk
from var_jax.sample.filtering import draw_tokens, filter_logits, guidance_strength, mix_guidance, smooth_embedding
from var_jax.sample.schedule import DEFAULT_WASTE_BUDGET, MODES, Segment, scale_plan
from var_jax.scale_config import scale_begin_ends
from var_jax.sharding import constrain
from var_jax.tokenizer import quantizer
from var_jax.tokenizer.vqvae import merge_for_decoding
from var_jax.transformer.config import check_tokenizer_pairing

# The fastest-running mode on this machine (benchmarks/sample_bench.py).
DEFAULT_MODE = "unrolled"


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Sampling settings (static: a change recompiles). The defaults are the reference FID setting."""
    cfg: float = 1.5                 # guidance scale; 0 turns guidance off (and the batch is not doubled)
    cfg_schedule: str = "linear"     # 'linear': t = cfg·si/(SN−1) (reference); 'constant': t = cfg
    #                                  (raster order: the same over the token index i, t = cfg·i/(L−1))
    top_k: int = 900                 # ≤ 0: off; 1: greedy
    top_p: float = 0.96              # ≤ 0: off
    more_smooth: bool = False        # Gumbel-softmax embeddings (visual only, not for FID)
    mode: str = DEFAULT_MODE         # 'unrolled' | 'grouped' | 'scanned'; raster order always scans its positions
    waste_budget: float = DEFAULT_WASTE_BUDGET   # grouped mode: padding allowed, as a fraction of L
    accel: Accelerators = Accelerators()         # sampling accelerators (sample/accelerate.py), all off by default

    def validate(self) -> "SampleOptions":
        if self.cfg < 0:
            raise ValueError(f"SampleOptions.cfg must be >= 0, got {self.cfg}")
        if self.cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"SampleOptions.cfg_schedule must be 'linear' or 'constant', got {self.cfg_schedule!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"SampleOptions.top_p must be in [0, 1], got {self.top_p}")
        if self.mode not in MODES:
            raise ValueError(f"SampleOptions.mode must be one of {MODES}, got {self.mode!r}")
        if self.waste_budget < 0:
            raise ValueError(f"SampleOptions.waste_budget must be >= 0, got {self.waste_budget}")
        return self

    @property
    def guided(self) -> bool:
        return self.cfg != 0


def image_keys(seed, image_ids):
    """One PRNG key per image: fold the global image index into the seed."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(image_ids, jnp.uint32))


def _double(x, guided: bool):
    """(B, ...) -> (2B, ...) as (cond, uncond) row pairs."""
    return jnp.repeat(x, 2, axis=0) if guided else x


def _guided_logits(logits2, t, guided: bool):
    if not guided:
        return logits2.astype(jnp.float32)
    pairs = logits2.reshape(logits2.shape[0] // 2, 2, *logits2.shape[1:])
    return mix_guidance(pairs[:, 0], pairs[:, 1], t)


def _choose(logits, keys, si, ratio, codebook, options: SampleOptions, bits: int = 0):
    """Filtered draw of one token per position, and the embedding map h the tokenizer adds: E[token], or the
    Gumbel-softmax mixture of codes with `more_smooth`. bits > 0: a bitwise head's per-bit draw."""
    scale_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, si)))(keys)
    if bits:
        return draw_bits(scale_keys, logits, ratio, bits, options)
    filtered = filter_logits(logits, options.top_k, options.top_p)
    tokens = draw_tokens(scale_keys[:, 0], filtered)
    if options.more_smooth:
        h = smooth_embedding(scale_keys[:, 1], filtered, ratio, codebook)
    else:
        h = jnp.take(codebook, tokens, axis=0)
    return tokens, h


def _apply_edit(tokens, h, embed, source_tokens, keep):
    """Editing: where `keep`, use the source image's token and its embedding (h = E[gt]·m + h·(1−m));
    embed(ids) -> their code vectors."""
    if source_tokens is None:
        return tokens, h
    tokens = jnp.where(keep, source_tokens, tokens)
    h = jnp.where(keep[..., None], embed(source_tokens), h)
    return tokens, h


def _pad_rows(x, rows: int):
    """Pad axis 1 with zeros to `rows`."""
    return jnp.pad(x, [(0, 0), (0, rows - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


class _ScaleWalker(AcceleratedWalk):
    """The scale loop of one sampling call; state between scales: (cache, f_hat, x) with x the next scale's
    transformer input (rows, pn², C). What the accelerators change (rows, model, cache layout) is in
    AcceleratedWalk; with them off it changes nothing."""

    def __init__(self, var, qparams, tok_cfg, cond, keys, options: SampleOptions, edit, with_logits: bool, *,
                 rows_labels=None, refiner=None, phases=()):
        self.var, self.qparams, self.tok_cfg = var, qparams, tok_cfg
        self.cond, self.keys, self.options, self.edit = cond, keys, options, edit
        self.with_logits = with_logits
        self.bits = var.cfg.bits   # a bitwise head's bits per token; 0 = index head
        # a bitwise head never needs the table of all 2^bits codes: it embeds the bits it draws
        self.codebook = None if self.bits else quantizer.code_vectors(qparams, tok_cfg)
        self.embed = lambda ids: quantizer.embed_ids(qparams, tok_cfg, ids).astype(jnp.float32)
        self.patch_nums = tok_cfg.patch_nums
        self.num_scales = len(self.patch_nums)
        self.batch = keys.shape[0]
        # per-scale guidance strength and ratio, computed once on the host so that every mode uses the very
        # same float32 values (a traced recomputation could round differently and change a token)
        self.ratios = np.float32([si / max(self.num_scales - 1, 1) for si in range(self.num_scales)])
        self.strengths = np.float32([guidance_strength(options.cfg, si, self.num_scales, options.cfg_schedule)
                                     for si in range(self.num_scales)])
        self.guided = options.guided   # False from a cfg stop scale on
        self.init_accelerators(rows_labels, refiner, phases)

    def embed_input(self, si: int, x_in):
        """Scale si's tokenizer input (B, pn², Cvae) -> the transformer's rows."""
        return _double(self.var.scale_input(si, x_in), self.guided)

    def _tokenizer_input(self, si: int, f_hat, h_flat):
        """Add scale si's map to f_hat; return (f_hat, the next scale's tokenizer input (B, pn², Cvae) or None)."""
        pn = self.patch_nums[si]
        h = h_flat.reshape(self.batch, pn, pn, -1)
        f_hat, next_in = quantizer.next_scale_input(self.qparams, self.tok_cfg, si, f_hat, h,
                                                    self.var.cfg.input_resize)
        return f_hat, next_in

    def _edit_inputs(self, si):
        if self.edit is None:
            return None, None
        source_tokens, keep = self.edit
        return source_tokens[si], keep[si]

    def exact_step(self, si: int, state):
        cache, f_hat, x = state
        logits2, cache = self.forward_exact(si, x, cache)
        logits = _guided_logits(logits2, self.strengths[si], self.guided)
        tokens, h = _choose(logits, self.keys, si, self.ratios[si], self.codebook, self.options, self.bits)
        tokens, h = _apply_edit(tokens, h, self.embed, *self._edit_inputs(si))
        f_hat, next_in = self._tokenizer_input(si, f_hat, h)
        self.record_input(si + 1, next_in)
        x = None if next_in is None else self.embed_input(si + 1, next_in)
        return (cache, f_hat, x), [(tokens, logits if self.with_logits else None)]

    def scanned_segment(self, seg: Segment, state):
        """The segment's scales in one lax.scan, every step padded to the segment's largest scale."""
        cache, f_hat, x = state
        step_rows = seg.step_tokens
        nexts = [self.patch_nums[s + 1] ** 2 for s in seg.scales if s + 1 < self.num_scales]
        carry_rows = max(nexts + [step_rows])
        first = seg.scales[0]
        options = self.options
        record = self.recording(first + 1)   # a refiner re-reads the drafted scales' inputs

        def branch(j):
            si = seg.scales[j]

            def run(f_hat, h):
                f_hat, next_in = self._tokenizer_input(si, f_hat, h[:, :self.patch_nums[si] ** 2])
                if next_in is None:
                    x_next = jnp.zeros((x.shape[0], carry_rows, x.shape[2]), x.dtype)
                    next_in = jnp.zeros((self.batch, carry_rows, self.tok_cfg.z_channels), jnp.float32)
                else:
                    x_next = self.embed_input(si + 1, next_in)
                raw = _pad_rows(next_in, carry_rows) if record else None
                return f_hat, _pad_rows(x_next.astype(x.dtype), carry_rows), raw
            return run

        branches = [branch(j) for j in range(len(seg.scales))]
        scales = jnp.asarray(seg.scales, jnp.int32)
        xs = {"si": scales, "start": jnp.asarray(seg.starts, jnp.int32),
              "valid": jnp.asarray([p * p for p in seg.patch_nums], jnp.int32),
              "t": jnp.asarray(self.strengths[list(seg.scales)]), "ratio": jnp.asarray(self.ratios[list(seg.scales)])}
        if self.edit is not None:
            source_tokens, keep = self.edit
            xs["source"] = jnp.stack([_pad_rows(source_tokens[s], step_rows) for s in seg.scales])
            xs["keep"] = jnp.stack([_pad_rows(keep[s], step_rows) for s in seg.scales])

        def body(carry, step):
            cache, f_hat, x = carry
            # padded step: only its first `valid` rows are real tokens; the padding rows are written to the cache
            # (the next scale overwrites them) but masked out as keys
            logits2, cache = self.var.forward_cached(x[:, :step_rows], self.cond, cache, step["start"],
                                                     kv_len=seg.kv_len, valid_len=step["valid"],
                                                     key_mask=self.window_mask(step["si"], seg.kv_len))
            logits = _guided_logits(logits2, step["t"], self.guided)
            tokens, h = _choose(logits, self.keys, step["si"], step["ratio"], self.codebook, options, self.bits)
            if self.edit is not None:
                tokens, h = _apply_edit(tokens, h, self.embed, step["source"], step["keep"])
            f_hat, x, raw = jax.lax.switch(step["si"] - first, branches, f_hat, h)
            return (cache, f_hat, x), (tokens, logits if self.with_logits else None, raw)

        (cache, f_hat, x), (tokens, logits, raw) = jax.lax.scan(body, (cache, f_hat, _pad_rows(x, carry_rows)), xs)
        for j, si in enumerate(seg.scales if record else ()):
            if si + 1 < self.num_scales:
                self.record_input(si + 1, raw[j, :, :self.patch_nums[si + 1] ** 2])
        last = seg.scales[-1]
        if last + 1 < self.num_scales:
            x = x[:, :self.patch_nums[last + 1] ** 2]
        return (cache, f_hat, x), [(tokens[j, :, :p * p], None if logits is None else logits[j, :, :p * p])
                                   for j, p in enumerate(seg.patch_nums)]


def _raster_tokens(var, codebook, cond, keys, options: SampleOptions, with_logits: bool):
    """Raster order (VARConfig.order='raster'): one token per step, a lax.scan over the L positions against the
    KV cache (static shapes: every step attends over L cached positions, masked to those written so far).
    Guidance ramps over the token index the way it ramps over scales: t = cfg·i/(L−1) ('linear'; 0 at the first
    token) or cfg ('constant'). Token i draws from fold_in(image key, i).
    Returns (tokens (B, L) int32, guided unfiltered logits (B, L, V) float32 or None)."""
    length = var.cfg.seq_len
    strengths = np.float32([guidance_strength(options.cfg, i, length, options.cfg_schedule) for i in range(length)])

    def body(carry, step):
        cache, x = carry
        i = step["i"]
        logits2, cache = var.forward_cached(x, cond, cache, i, kv_len=length, valid_len=1)
        logits = _guided_logits(logits2, step["t"], options.guided)
        filtered = filter_logits(logits, options.top_k, options.top_p)
        tokens = draw_tokens(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), filtered)   # (B, 1)
        # the next position reads this token's code vector (after the last position it is not used)
        x = _double(var.token_input(jnp.minimum(i + 1, length - 1), jnp.take(codebook, tokens, axis=0)),
                    options.guided).astype(x.dtype)
        return (cache, x), (tokens[:, 0], logits[:, 0] if with_logits else None)

    cache = jax.tree.map(lambda c: constrain(c, ("layers", "batch", "seq", "heads", None)),
                         var.init_cache(cond.shape[0]))
    steps = {"i": jnp.arange(length, dtype=jnp.int32), "t": jnp.asarray(strengths)}
    _, (tokens, logits) = jax.lax.scan(body, (cache, var.first_scale_input(cond)), steps)
    return tokens.T.astype(jnp.int32), None if logits is None else jnp.swapaxes(logits, 0, 1)


def _check_raster_options(options: SampleOptions, edit):
    if options.more_smooth:
        raise ValueError("more_smooth is a next-scale option (soft embeddings per scale); raster order has none")
    if edit is not None:
        raise ValueError("editing (source tokens per scale) is not supported in raster order")


def generate(var, tokenizer, labels, keys, options: SampleOptions, edit=None, *, decode: bool = True,
             with_logits: bool = False, refiner=None):
    """Sample token maps and images. Runs inside jit (on merged modules).

    labels (B,) int (num_classes = null class), keys (B,) PRNG keys (see `image_keys`), edit None or
    (source_tokens, keep) with per-scale lists of (B, pn²) int32 / bool. Returns a dict: 'images' (B, H, W, 3)
    in [0, 1] float32 (with `decode`), 'f_hat' (B, h, w, Cvae), 'tokens' (list of (B, pn²) int32 per scale) and,
    with `with_logits`, 'logits' (list of the guided, unfiltered (B, pn², V) float32 logits per scale).
    refiner: a second VAR of the same tokenizer for the scales from options.accel.draft_scales on."""
    tok_cfg = tokenizer.cfg
    var_cfg = var.cfg
    if tuple(var_cfg.patch_nums) != tuple(tok_cfg.patch_nums):
        raise ValueError(f"transformer patch_nums {var_cfg.patch_nums} != tokenizer patch_nums {tok_cfg.patch_nums}")
    check_tokenizer_pairing(var_cfg.head, var_cfg.order, tok_cfg)
    accel = options.accel
    if accel.active or refiner is not None:
        accel.validate(tok_cfg.num_scales, guided=options.guided, refiner=refiner is not None, order=var_cfg.order)
        check_refiner(var_cfg, None if refiner is None else refiner.cfg)
    labels = jnp.asarray(labels, jnp.int32)
    batch = labels.shape[0]
    rows_labels = jnp.stack([labels, jnp.full_like(labels, var_cfg.num_classes)], axis=1).reshape(-1) \
        if options.guided else labels
    cond = var.cond_embedding(rows_labels)
    qparams = tokenizer.quantizer_params()
    if var_cfg.order == "raster":
        _check_raster_options(options, edit)
        tokens, logits = _raster_tokens(var, qparams["codebook"].astype(jnp.float32), cond, keys, options,
                                        with_logits)
        out = {"f_hat": quantizer.tokens_to_fhat(qparams, [tokens], tok_cfg), "tokens": [tokens]}
        return _finish(out, tokenizer, decode, [logits] if with_logits else None)
    s = tok_cfg.latent_size
    plan = scale_plan(tok_cfg.patch_nums, options.mode, options.waste_budget, cuts=plan_cuts(accel, options.guided),
                      unrolled_from=unrolled_from(accel, tok_cfg.patch_nums))
    # a last scale run on its own never needs its keys stored (nothing after it reads them): the cache then ends
    # where it begins (424 of 680 positions at 256 px, 62 % of the cache's memory)
    last_begin = scale_begin_ends(tok_cfg.patch_nums)[-1][0]
    cache_len = last_begin if last_begin and not plan[-1].scanned else var_cfg.seq_len
    walk_phases = phases(tok_cfg.patch_nums, accel, plan) if accel.active else ()
    if walk_phases:   # the main model's cache layout (cache_layout.py)
        cache_len = walk_phases[0].layout.length
    # rows (and an image's two guidance rows together) stay on the device that holds their image
    cache = jax.tree.map(lambda c: constrain(c, ("layers", "batch", "seq", "heads", None)),
                         var.init_cache(rows_labels.shape[0], length=cache_len))
    f_hat = constrain(jnp.zeros((batch, s, s, tok_cfg.z_channels), jnp.float32), ("batch", None, None, None))
    state = (cache, f_hat, var.first_scale_input(cond))
    walker = _ScaleWalker(var, qparams, tok_cfg, cond, keys, options, edit, with_logits, rows_labels=rows_labels,
                          refiner=refiner, phases=walk_phases)
    per_scale = []
    for seg in plan:
        state = walker.enter(seg.scales[0], state)
        if seg.scanned:
            state, outputs = walker.scanned_segment(seg, state)
        else:
            state, outputs = walker.exact_step(seg.scales[0], state)
        per_scale += outputs
    out = {"f_hat": state[1], "tokens": [t.astype(jnp.int32) for t, _ in per_scale]}
    return _finish(out, tokenizer, decode, [lg for _, lg in per_scale] if with_logits else None)


def _finish(out, tokenizer, decode: bool, logits):
    """Add the decoded images (in [0, 1]) and the per-scale logits to a sampling result."""
    if decode:
        out["images"] = (tokenizer.decode(out["f_hat"]) + 1) * 0.5
    if logits is not None:
        out["logits"] = logits
    return out


@functools.lru_cache(maxsize=16)
def make_sample_fn(var_graphdef, tokenizer_graphdef, options: SampleOptions, *, decode: bool = True,
                   with_logits: bool = False, encoder_spec=(), refiner_graphdef=None):
    """jit(fn(var_state, tokenizer_state, labels, image_ids, seed, edit=None, refiner_state=None) -> dict), see
    `generate`; refiner_graphdef / refiner_state: the refiner of options.accel.draft_scales.
    tokenizer_state: the whole state (nnx.split) or, with its encoder_spec, the state of split_for_decoding
    (sampling never encodes, so the encoder's weights need not be passed or kept).
    Cached: the same model structure and options reuse one compiled function."""
    options.validate()

    @jax.jit
    def sample_fn(var_state, tokenizer_state, labels, image_ids, seed, edit=None, refiner_state=None):
        var = nnx.merge(var_graphdef, var_state)
        tokenizer = merge_for_decoding(tokenizer_graphdef, tokenizer_state, encoder_spec)
        refiner = None if refiner_graphdef is None else nnx.merge(refiner_graphdef, refiner_state)
        return generate(var, tokenizer, labels, image_keys(seed, image_ids), options, edit, decode=decode,
                        with_logits=with_logits, refiner=refiner)

    return sample_fn
