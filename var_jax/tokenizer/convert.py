"""Reference VQVAE state_dict (PyTorch names and layouts) <-> var-jax `VQVAE`.

Our module tree mirrors the reference names, so a parameter path maps to a key by joining with dots, renaming the
leaf (`kernel`/`scale` -> `weight`) and transposing conv kernels (O, I, kh, kw) <-> (kh, kw, I, O). The stacked Phi
convs map to one key per conv, named after the reference's sharing mode.

Hyper-parameters are inferred from the shapes; `patch_nums` and the Phi ratio `quant_resi` are not stored in a
state_dict and are arguments (defaults: the released 256 px tokenizer).
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.scale_config import REFERENCE_PATCH_NUMS
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE

# A buffer of the reference's training-time usage statistics; not a parameter, ignored when loading.
IGNORED_KEYS = ("quantize.ema_vocab_hit_SV",)
CODEBOOK_KEY = "quantize.embedding.weight"


class StateDictMismatch(ValueError):
    """A state_dict that does not fit the model: lists the missing, unexpected and mis-shaped keys."""

    def __init__(self, missing=(), unexpected=(), misshaped=()):
        self.missing, self.unexpected, self.misshaped = sorted(missing), sorted(unexpected), sorted(misshaped)
        parts = []
        if self.missing:
            parts.append(f"missing keys {self.missing}")
        if self.unexpected:
            parts.append(f"unexpected keys {self.unexpected}")
        if self.misshaped:
            parts.append("mis-shaped keys " + ", ".join(f"{k}: expected {e}, got {g}" for k, e, g in self.misshaped))
        super().__init__("VQVAE state_dict does not match: " + "; ".join(parts))


def _conv_to_torch(w):
    return np.transpose(w, (3, 2, 0, 1))      # (kh, kw, I, O) -> (O, I, kh, kw)


def _conv_from_torch(w):
    return np.transpose(w, (2, 3, 1, 0))


def _phi_keys(cfg: TokenizerConfig) -> list[str]:
    """Reference key prefix of each Phi conv, by sharing mode (PhiPartiallyShared / PhiShared / PhiNonShared)."""
    if cfg.num_phi == 0:
        return []
    if cfg.share_quant_resi == 1:
        return ["quantize.quant_resi.qresi"]
    if cfg.share_quant_resi == 0:
        return [f"quantize.quant_resi.{k}" for k in range(cfg.num_phi)]
    return [f"quantize.quant_resi.qresi_ls.{k}" for k in range(cfg.num_phi)]


def _module_key(path) -> str:
    *modules, leaf = (str(p) for p in path)
    return ".".join(modules + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _param_flat_state(model: VQVAE):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def check_reference_quantizer(cfg: TokenizerConfig):
    """The reference VQVAE quantizes with a codebook: a BSQ tokenizer (Infinity's, no codebook) has no layout."""
    if cfg.quantizer != "vq":
        raise ValueError(f"quantizer={cfg.quantizer!r} has no reference checkpoint layout: the reference VQVAE "
                         "quantizes with a codebook, and BSQ (Infinity's) has none; train the tokenizer with var-jax "
                         "instead of converting")


def _reference_layout(model: VQVAE):
    """(reference key, our parameter path, index into the stacked Phi axis or None, our Variable) per tensor."""
    check_reference_quantizer(model.cfg)
    phi_keys = _phi_keys(model.cfg)
    for path, var in _param_flat_state(model):
        if path == ("codebook",):
            yield CODEBOOK_KEY, path, None, var
        elif path in (("phi_kernels",), ("phi_biases",)):
            suffix = ".weight" if path == ("phi_kernels",) else ".bias"
            for k, prefix in enumerate(phi_keys):
                yield prefix + suffix, path, k, var
        else:
            yield _module_key(path), path, None, var


def _torch_shape(shape) -> tuple[int, ...]:
    # Convs are the only 4-D tensors of the tokenizer.
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def vqvae_to_state_dict(model: VQVAE) -> dict[str, np.ndarray]:
    """Our model -> a reference `VQVAE.state_dict()` (numpy, float32), loadable with `load_state_dict(strict=True)`."""
    sd = {}
    for key, _, k, var in _reference_layout(model):
        value = np.asarray(var.get_value(), dtype=np.float32)
        value = value if k is None else value[k]
        sd[key] = _conv_to_torch(value) if value.ndim == 4 else value
    cfg = model.cfg
    sd["quantize.ema_vocab_hit_SV"] = np.zeros((cfg.num_scales, cfg.vocab_size), np.float32)
    return sd


def reference_shapes(model: VQVAE) -> dict[str, tuple[int, ...]]:
    """Reference key -> shape for a model (abstract or concrete), without the ignored buffers."""
    return {key: _torch_shape(var.get_value().shape[0 if k is None else 1:])
            for key, _, k, var in _reference_layout(model)}


def _indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def infer_config(sd: dict, patch_nums=REFERENCE_PATCH_NUMS[256], quant_resi: float = 0.5,
                 **overrides) -> TokenizerConfig:
    """TokenizerConfig from the shapes of a reference VQVAE state_dict."""
    needed = [CODEBOOK_KEY, "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quant_conv.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise StateDictMismatch(missing=missing)
    vocab_size, z_channels = sd[CODEBOOK_KEY].shape
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if levels != list(range(len(levels))):
        raise StateDictMismatch(missing=[f"encoder.down.{i}.*" for i in range(max(levels)) if i not in levels])
    ch_mult = []
    for i in levels:
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if key not in sd:
            raise StateDictMismatch(missing=[key])
        ch_mult.append(sd[key].shape[0] // ch)
    attn_levels = tuple(i for i in levels if f"encoder.down.{i}.attn.0.qkv.weight" in sd)
    patch_nums = tuple(int(p) for p in patch_nums)
    phi_partial = _indices(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight")
    phi_per_scale = _indices(sd, r"quantize\.quant_resi\.(\d+)\.weight")
    if phi_partial:
        share_quant_resi = len(phi_partial)
    elif "quantize.quant_resi.qresi.weight" in sd:
        share_quant_resi = 1
    elif phi_per_scale:
        share_quant_resi = 0
        if len(phi_per_scale) != len(patch_nums):
            raise ValueError(f"state_dict has {len(phi_per_scale)} per-scale Phi convs but patch_nums "
                             f"{patch_nums} has {len(patch_nums)} scales")
    else:
        share_quant_resi, quant_resi = 4, 0.0    # no Phi convs at all: the reference's identity Phi
    cfg = TokenizerConfig(
        vocab_size=int(vocab_size), z_channels=int(z_channels), ch=int(ch), ch_mult=tuple(ch_mult),
        num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")),
        attn_levels=None if attn_levels == (levels[-1],) else attn_levels,
        quant_conv_ks=int(sd["quant_conv.weight"].shape[-1]), quant_resi=float(quant_resi),
        share_quant_resi=share_quant_resi, patch_nums=patch_nums, **overrides)
    return cfg.validate()


def vqvae_from_state_dict(sd: dict, patch_nums=REFERENCE_PATCH_NUMS[256], quant_resi: float = 0.5,
                          **overrides) -> tuple[TokenizerConfig, VQVAE]:
    """(config, VQVAE) from a reference state_dict of numpy arrays (or anything np.asarray accepts).

    `overrides` set config fields that a state_dict cannot tell (beta, using_znorm, dropout).
    Raises StateDictMismatch naming every missing, unexpected or mis-shaped key.
    """
    sd = {k: np.asarray(v) for k, v in sd.items() if k not in IGNORED_KEYS}
    cfg = infer_config(sd, patch_nums, quant_resi, **overrides)
    # Build without computing any initial values; every parameter is then taken from the state_dict.
    abstract = nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = reference_shapes(abstract)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [(k, expected[k], tuple(sd[k].shape)) for k in expected
                 if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        raise StateDictMismatch(missing, unexpected, misshaped)

    values: dict = {}
    for key, path, k, var in _reference_layout(abstract):
        value = sd[key].astype(np.float32)
        value = _conv_from_torch(value) if value.ndim == 4 else value
        if k is None:
            values[path] = value
        else:
            values.setdefault(path, []).append(value)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            # A stacked Phi parameter with K = 0 (identity Phi) has no reference keys: keep its empty shape.
            value = values.get(path, np.zeros(var.get_value().shape, np.float32))
            var = var.replace(jnp.asarray(np.stack(value) if isinstance(value, list) else value))
        flat.append((path, var))
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))
