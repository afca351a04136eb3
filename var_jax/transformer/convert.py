"""Reference (PyTorch) VAR state_dict <-> var-jax VAR, in both directions.

Reference layouts: Linear weight (out, in) -> our kernel (in, out); `blocks.{i}.*` -> one stacked array with a
leading layers axis; `scale_mul_1H11` (1,H,1,1) -> (H,); `ada_gss` (1,1,6,C) -> (6C,) (same chunk order as the
ada_lin output). The buffers `lvl_1L`, `attn_bias_for_masking` and `zero_k_bias` are derived, not loaded (they
are rebuilt by `var_to_state_dict` so the result loads strictly into the reference model).
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
from flax import nnx

from var_jax.scale_config import REFERENCE_PATCH_NUMS, prefix_len
from var_jax.transformer.config import VARConfig
from var_jax.transformer.model import VAR, block_causal_mask

_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# our parameter path -> (reference key, how the reference array becomes ours); "T" = transpose a Linear weight
_TOP = {
    ("word_embed", "kernel"): ("word_embed.weight", "T"),
    ("word_embed", "bias"): ("word_embed.bias", None),
    ("class_emb", "embedding"): ("class_emb.weight", None),
    ("pos_start",): ("pos_start", None),
    ("pos_1LC",): ("pos_1LC", None),
    ("lvl_embed", "embedding"): ("lvl_embed.weight", None),
    ("head_nm", "ada_lin", "kernel"): ("head_nm.ada_lin.1.weight", "T"),
    ("head_nm", "ada_lin", "bias"): ("head_nm.ada_lin.1.bias", None),
    ("head", "kernel"): ("head.weight", "T"),
    ("head", "bias"): ("head.bias", None),
}
_SHARED_ALN = {
    ("shared_ada_lin", "kernel"): ("shared_ada_lin.1.weight", "T"),
    ("shared_ada_lin", "bias"): ("shared_ada_lin.1.bias", None),
}
_BLOCK = {
    ("attn", "mat_qkv", "kernel"): ("attn.mat_qkv.weight", "T"),
    ("attn", "q_bias"): ("attn.q_bias", None),
    ("attn", "v_bias"): ("attn.v_bias", None),
    ("attn", "proj", "kernel"): ("attn.proj.weight", "T"),
    ("attn", "proj", "bias"): ("attn.proj.bias", None),
    ("ffn", "fc1", "kernel"): ("ffn.fc1.weight", "T"),
    ("ffn", "fc1", "bias"): ("ffn.fc1.bias", None),
    ("ffn", "fc2", "kernel"): ("ffn.fc2.weight", "T"),
    ("ffn", "fc2", "bias"): ("ffn.fc2.bias", None),
}
_BLOCK_L2 = {("attn", "scale_mul"): ("attn.scale_mul_1H11", "flat")}
_BLOCK_ADA_LIN = {("ada_lin", "kernel"): ("ada_lin.1.weight", "T"), ("ada_lin", "bias"): ("ada_lin.1.bias", None)}
_BLOCK_ADA_GSS = {("ada_gss",): ("ada_gss", "flat")}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)


def _block_tables(cfg: VARConfig) -> dict:
    table = dict(_BLOCK)
    table.update(_BLOCK_L2 if cfg.attn_l2_norm else {})
    table.update(_BLOCK_ADA_GSS if cfg.shared_aln else _BLOCK_ADA_LIN)
    return table


def _top_table(cfg: VARConfig) -> dict:
    return {**_TOP, **(_SHARED_ALN if cfg.shared_aln else {})}


def _patch_nums_from(sd, seq_len: int, tokenizer_config, patch_nums):
    if patch_nums is not None:
        source, found = "patch_nums", tuple(int(p) for p in patch_nums)
    elif getattr(tokenizer_config, "patch_nums", None) is not None:
        source, found = "tokenizer_config.patch_nums", tuple(int(p) for p in tokenizer_config.patch_nums)
    elif "lvl_1L" in sd:
        counts = np.bincount(sd["lvl_1L"].reshape(-1).astype(np.int64))
        sides = [math.isqrt(int(c)) for c in counts]
        if any(s * s != c for s, c in zip(sides, counts)):
            raise ValueError(f"lvl_1L: scale sizes {counts.tolist()} are not squares; pass patch_nums=")
        source, found = "lvl_1L", tuple(sides)
    else:
        known = {prefix_len(pn): pn for pn in REFERENCE_PATCH_NUMS.values()}
        if seq_len not in known:
            raise ValueError(f"pos_1LC has L={seq_len}, not a released model's; pass patch_nums=")
        source, found = "pos_1LC length", known[seq_len]
    if prefix_len(found) != seq_len:
        raise ValueError(f"{source}={found} gives L={prefix_len(found)}, but pos_1LC has L={seq_len}")
    return found


def check_reference_variant(adaln: bool = True, order: str = "scale", head: str = "index", quantizer: str = "vq"):
    """Reference checkpoints are AdaLN next-scale models of a VQ codebook: the ablation variants and Infinity's
    bitwise head / BSQ tokens have no reference layout."""
    if head != "index":
        raise ValueError(f"head={head!r} (Infinity's bitwise head) has no reference checkpoint layout: reference VAR "
                         "checkpoints predict VQ codebook indices; train the model with var-jax instead of converting")
    if quantizer != "vq":
        raise ValueError(f"a tokenizer with quantizer={quantizer!r} has no reference VAR checkpoint: reference VAR "
                         "checkpoints predict VQ codebook indices; train the model with var-jax instead of converting")
    if not adaln:
        raise ValueError("adaln=False (the w/o-AdaLN ablation) has no reference checkpoint layout: reference VAR "
                         "checkpoints always have AdaLN; train the ablation with var-jax instead of converting")
    if order != "scale":
        raise ValueError(f"order={order!r} (the raster-order baseline) has no reference checkpoint layout: "
                         "reference VAR checkpoints are next-scale models; train the baseline with var-jax")


def config_from_state_dict(sd, tokenizer_config=None, patch_nums=None, *, heads=None, **overrides) -> VARConfig:
    """Infer the VARConfig of a reference VAR state_dict (keys without a prefix; numpy arrays or torch tensors)."""
    check_reference_variant(overrides.get("adaln", True), overrides.get("order", "scale"),
                            overrides.get("head", "index"), getattr(tokenizer_config, "quantizer", "vq"))
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    def need(key, ndim):
        if key not in sd:
            raise KeyError(f"reference VAR state_dict: missing key {key!r}")
        if sd[key].ndim != ndim:
            raise ValueError(f"reference VAR state_dict: {key!r} must have {ndim} dims, got shape {sd[key].shape}")
        return sd[key].shape

    C, z_channels = need("word_embed.weight", 2)
    num_classes = need("class_emb.weight", 2)[0] - 1
    vocab_size = need("head.weight", 2)[0]
    seq_len = need("pos_1LC", 3)[1]
    block_ids = {int(m.group(1)) for k in sd for m in [_BLOCK_KEY.match(k)] if m}
    depth = len(block_ids)
    if depth == 0 or block_ids != set(range(depth)):
        raise KeyError(f"reference VAR state_dict: blocks must be numbered 0..depth-1, found {sorted(block_ids)}")
    mlp_hidden = need("blocks.0.ffn.fc1.weight", 2)[0]
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
    shared_aln = "blocks.0.ada_gss" in sd
    if attn_l2_norm:
        inferred = need("blocks.0.attn.scale_mul_1H11", 4)[1]
        if heads is not None and heads != inferred:
            raise ValueError(f"heads={heads} disagrees with blocks.0.attn.scale_mul_1H11, which has {inferred} heads")
        heads = inferred
    elif heads is None:
        if C % 64:
            raise ValueError(f"cannot infer the head count of a width-{C} model without scale_mul_1H11 "
                             f"(head_dim 64 does not divide it): pass heads=")
        heads = C // 64   # the reference shape rule: head_dim 64
    if tokenizer_config is not None:
        for field, value in (("vocab_size", vocab_size), ("z_channels", z_channels)):
            theirs = getattr(tokenizer_config, field, None)
            if theirs is not None and int(theirs) != value:
                raise ValueError(f"tokenizer_config.{field}={theirs} but the VAR state_dict has {value}")
    patch_nums = _patch_nums_from(sd, seq_len, tokenizer_config, patch_nums)
    return VARConfig(depth=depth, width=C, heads=heads, num_classes=num_classes, vocab_size=vocab_size,
                     z_channels=z_channels, patch_nums=patch_nums, mlp_ratio=mlp_hidden / C, shared_aln=shared_aln,
                     attn_l2_norm=attn_l2_norm, **overrides)


def _reference_to_ours(array, how, shape):
    if how == "T":
        array = array.T
    elif how == "flat":
        array = array.reshape(shape)
    return array


def var_from_state_dict(sd, tokenizer_config=None, patch_nums=None, *, heads=None, **overrides):
    """Reference VAR state_dict -> (VARConfig, VAR). Accepts numpy arrays or torch tensors. `heads` is needed
    only when it cannot be inferred (no scale_mul_1H11 and width not a multiple of 64); `overrides` set other
    VARConfig fields (compute_dtype, remat, cond_drop_rate, ...)."""
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    cfg = config_from_state_dict(sd, tokenizer_config, patch_nums, heads=heads, **overrides)
    for i in range(cfg.depth):
        key = f"blocks.{i}.attn.zero_k_bias"
        if key in sd and np.any(sd[key] != 0):
            raise ValueError(f"{key} is not zero; the reference treats it as a zero buffer")
    abstract = nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    used = set(_BUFFERS) | {f"blocks.{i}.attn.zero_k_bias" for i in range(cfg.depth)}

    def load(path, ref_key, how, per_block):
        want = flat[path].get_value().shape
        if per_block:
            parts = []
            for i in range(cfg.depth):
                key = f"blocks.{i}.{ref_key}"
                if key not in sd:
                    raise KeyError(f"reference VAR state_dict: missing key {key!r}")
                parts.append(converted_array(key, how, want[1:], path))
                used.add(key)
            array = np.stack(parts)
        else:
            if ref_key not in sd:
                raise KeyError(f"reference VAR state_dict: missing key {ref_key!r}")
            array = converted_array(ref_key, how, want, path)
            used.add(ref_key)
        flat[path].set_value(jax.numpy.asarray(array, jax.numpy.float32))

    def converted_array(key, how, want, path):
        array, size = sd[key], int(np.prod(want))
        expected = {"T": tuple(want[::-1]), None: tuple(want)}.get(how)   # "flat": any shape of that size
        if (array.size != size) if how == "flat" else (array.shape != expected):
            raise ValueError(f"reference VAR state_dict: {key!r} has shape {array.shape}, expected "
                             f"{expected or f'{size} elements'} (for {'.'.join(map(str, path))} {tuple(want)})")
        return _reference_to_ours(array, how, want)

    for path, (ref_key, how) in _top_table(cfg).items():
        load(path, ref_key, how, per_block=False)
    for path, (ref_key, how) in _block_tables(cfg).items():
        load(("blocks",) + path, ref_key, how, per_block=True)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise KeyError(f"reference VAR state_dict: unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = [p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        raise KeyError(f"parameters not set by the conversion: {missing}")
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))


def var_to_state_dict(model: VAR) -> dict[str, np.ndarray]:
    """var-jax VAR -> the reference state_dict (float32 numpy; buffers included, so it loads strictly)."""
    cfg = model.cfg
    check_reference_variant(cfg.adaln, cfg.order, cfg.head)
    flat = {path: np.asarray(v.get_value(), np.float32) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    C = cfg.width
    sd: dict[str, np.ndarray] = {}
    for path, (ref_key, how) in _top_table(cfg).items():
        sd[ref_key] = flat[path].T if how == "T" else flat[path]
    sd["lvl_1L"] = np.asarray(cfg.scale_ids, np.int64)[None]
    sd["attn_bias_for_masking"] = np.where(block_causal_mask(cfg.scale_ids), 0.0, -np.inf).astype(np.float32)[None, None]
    ref_shapes = {"attn.scale_mul_1H11": (1, cfg.heads, 1, 1), "ada_gss": (1, 1, 6, C)}
    for i in range(cfg.depth):
        for path, (ref_key, how) in _block_tables(cfg).items():
            array = flat[("blocks",) + path][i]
            sd[f"blocks.{i}.{ref_key}"] = array.T if how == "T" else (
                array.reshape(ref_shapes[ref_key]) if how == "flat" else array)
        sd[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((C,), np.float32)
    return sd
