"""Hyper-parameters of the VAR transformer (one frozen, hashable dataclass) and the settings a run chooses.

A VARConfig holds the model's identity (architecture, vocabulary, patch_nums, classes) and, for the module to
read as static values, three run settings (`RUN_SETTINGS`: compute dtype, remat, attention implementation).
Only the identity is saved (`to_dict`) and compared; the run settings come from `RunSettings`, resolved for the
backend the process runs on, and are applied with `VARConfig.with_run_settings`.

`width`, `heads`, `drop_path_rate` and `init_std` may be left unset (None / -1); they are resolved from `depth`
when the config is built, following the reference shape rule (C = 64·depth, heads = depth, drop-path 0.1·depth/24,
init std sqrt(1/(3C))). Use `preset(depth)` (or build a new config) to change the depth: `dataclasses.replace`
keeps the already-resolved width and heads.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax

from var_jax.scale_config import PATCH_NUMS_256, PATCH_NUMS_512, ScaleScheduleConfig

# init_adaln_gamma of the README training recipes (alng), by depth; other depths keep the 1e-5 default.
RECIPE_INIT_ADALN_GAMMA = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5, 36: 5e-6}

REMAT_MODES = ("none", "block")
COMPUTE_DTYPES = ("float32", "bfloat16")
# "grouped": var_jax/transformer/attention.py (skips masked score blocks, lean backward; fastest on CPU);
# "xla" / "cudnn": jax.nn.dot_product_attention with that implementation; "auto": "grouped" on CPU, else
# jax.nn.dot_product_attention choosing its implementation (cuDNN flash attention on GPUs where it applies);
# "splash" (TPU) / "pallas" (GPU): var_jax/transformer/block_sparse.py, kernels that skip the fully masked tiles of
# the block-causal mask (full-sequence attention only; KV-cache steps take the "auto" path). Checked in the Pallas
# interpreter on CPU only, never timed on hardware, so "auto" does not pick them.
ATTENTION_IMPLS = ("auto", "grouped", "xla", "cudnn", "splash", "pallas")
# VARConfig fields that say how to run the model, not what it is: not saved with it, free to change on resume.
RUN_SETTINGS = ("compute_dtype", "remat", "attention_impl")
ACCELERATOR_BACKENDS = ("gpu", "tpu", "cuda", "rocm")
# "scale": next-scale prediction (VAR); "raster": the next-token AR baseline over one token map (patch_nums (n,)).
ORDERS = ("scale", "raster")
# "index": one V-way softmax per token (VAR); "bitwise": d two-way logits per token for the d bits of a BSQ
# tokenizer (Infinity's bitwise classifier, V = 2^d with d = z_channels; transformer/bitwise_head.py)
HEADS = ("index", "bitwise")
# how the next scale's input is resized from the summed tokenizer maps (tokenizer/quantizer.resolve_resize):
# "auto" = the tokenizer's own (VAR's area for VQ, Infinity's bilinear for BSQ)
INPUT_RESIZES = ("auto", "area", "bilinear")
# fields added after the first model directories, with their defaults: left out of `to_dict` while at them, so that
# such a model's config reads exactly as before they existed
OPTIONAL_FIELDS = {"head": "index", "input_resize": "auto"}


def resolve_compute_dtype(name: str, backend: str | None = None) -> str:
    """'auto' -> bfloat16 on GPU/TPU, float32 on CPU (`backend` defaults to JAX's default backend)."""
    if name == "auto":
        if backend is None:
            backend = jax.default_backend()
        return "bfloat16" if backend in ACCELERATOR_BACKENDS else "float32"
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: must be 'auto' or one of {COMPUTE_DTYPES}, got {name!r}")
    return name


@dataclass(frozen=True)
class RunSettings:
    """How this process runs a VAR model; every command that runs one takes them (configs, --compute-dtype)."""
    compute_dtype: str = "auto"     # 'auto' | 'float32' | 'bfloat16'; parameters stay float32
    remat: str = "none"             # see REMAT_MODES
    attention_impl: str = "auto"    # see ATTENTION_IMPLS

    def resolved(self, backend: str | None = None) -> "RunSettings":
        """'auto' compute dtype replaced by the backend's; the others checked."""
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat: must be one of {REMAT_MODES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl: must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        return dataclasses.replace(self, compute_dtype=resolve_compute_dtype(self.compute_dtype, backend))


@dataclass(frozen=True)
class VARConfig(ScaleScheduleConfig):
    depth: int = 16
    width: int | None = None            # -> 64·depth
    heads: int | None = None            # -> depth
    num_classes: int = 1000             # class index num_classes is the unconditional ("null") class
    vocab_size: int = 4096
    z_channels: int = 32                # Cvae: tokenizer latent channels
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    attn_l2_norm: bool = True
    drop_path_rate: float | None = None  # -> 0.1·depth/24
    cond_drop_rate: float = 0.1
    norm_eps: float = 1e-6
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0              # < 0 -> sqrt(1/(3·width))
    # ablations (the paper's Table 3): False = class only in the start token, plain affine LayerNorm in the
    # blocks and head; 'raster' = token-by-token AR over a single-scale tokenizer (see ORDERS)
    adaln: bool = True
    order: str = "scale"
    head: str = "index"                 # see HEADS
    input_resize: str = "auto"          # see INPUT_RESIZES
    # run settings (RUN_SETTINGS), not saved: set them with `with_run_settings`
    remat: str = "none"                 # "block": rematerialise each scanned block in the backward pass
    compute_dtype: str = "float32"      # parameters stay float32; activations use this dtype
    attention_impl: str = "auto"        # see ATTENTION_IMPLS; "cudnn" needs a GPU and bf16

    def __post_init__(self):
        resolve = lambda name, value: object.__setattr__(self, name, value)
        resolve("patch_nums", tuple(int(p) for p in self.patch_nums))
        if self.width is None:
            resolve("width", 64 * self.depth)
        if self.heads is None:
            resolve("heads", self.depth)
        if self.drop_path_rate is None:
            resolve("drop_path_rate", 0.1 * self.depth / 24)
        if self.init_std < 0 and isinstance(self.width, int) and self.width > 0:
            resolve("init_std", math.sqrt(1.0 / (3 * self.width)))
        self.validate()

    # ---- resolved shapes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def bits(self) -> int:
        """Bits per token a bitwise head predicts (z_channels, the BSQ tokenizer's d); 0 for an index head."""
        return self.z_channels if self.head == "bitwise" else 0

    @property
    def head_size(self) -> int:
        """Outputs per position: V logits, or two per bit (bit j's pair at [2j, 2j+1], Infinity's layout)."""
        return 2 * self.bits if self.head == "bitwise" else self.vocab_size

    @property
    def first_l(self) -> int:
        """Positions fed the start token: the whole first scale, or the one first token in raster order."""
        return 1 if self.order == "raster" else self.patch_nums[0] ** 2

    # ---- identity and run settings ---------------------------------------------------------------------------
    @property
    def run_settings(self) -> RunSettings:
        return RunSettings(**{name: getattr(self, name) for name in RUN_SETTINGS})

    def with_run_settings(self, settings: RunSettings | None = None, backend: str | None = None) -> "VARConfig":
        """This model run with `settings` (None: the defaults), resolved for `backend` (None: JAX's default)."""
        settings = (settings or RunSettings()).resolved(backend)
        return dataclasses.replace(self, **dataclasses.asdict(settings))

    def to_dict(self) -> dict[str, Any]:
        """The model's identity, JSON-safe: every field but the run settings (and OPTIONAL_FIELDS at defaults)."""
        return {k: v for k, v in super().to_dict().items()
                if k not in RUN_SETTINGS and not (k in OPTIONAL_FIELDS and v == OPTIONAL_FIELDS[k])}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VARConfig":
        """From `to_dict` output; run settings stored by older model directories are ignored (defaults apply)."""
        return super().from_dict({k: v for k, v in d.items() if k not in RUN_SETTINGS})

    # ---- checks and (de)serialisation ------------------------------------------------------------------------
    def validate(self) -> "VARConfig":
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"VARConfig.{field}: {why} (got {getattr(self, field)!r})")
        need(isinstance(self.depth, int) and self.depth >= 1, "depth", "must be a positive int")
        need(isinstance(self.width, int) and self.width >= 1, "width", "must be a positive int")
        need(isinstance(self.heads, int) and self.heads >= 1, "heads", "must be a positive int")
        need(self.width % self.heads == 0, "width", f"must be divisible by heads={self.heads}")
        need(self.num_classes >= 1, "num_classes", "must be >= 1")
        need(self.vocab_size >= 1, "vocab_size", "must be >= 1")
        need(self.z_channels >= 1, "z_channels", "must be >= 1")
        need(len(self.patch_nums) >= 1 and all(p >= 1 for p in self.patch_nums), "patch_nums",
             "must be a non-empty sequence of positive ints")
        need(all(a < b for a, b in zip(self.patch_nums, self.patch_nums[1:])), "patch_nums",
             "must be strictly increasing")
        need(self.order in ORDERS, "order", f"must be one of {ORDERS}")
        need(self.order != "raster" or len(self.patch_nums) == 1, "patch_nums",
             "raster order needs a single-scale tokenizer (patch_nums of one side, e.g. (4,))")
        need(self.adaln or not self.shared_aln, "shared_aln", "needs adaln=True (it shares the AdaLN projection)")
        need(self.head in HEADS, "head", f"must be one of {HEADS}")
        need(self.head != "bitwise" or self.vocab_size == 2 ** self.z_channels, "head",
             f"'bitwise' predicts the z_channels bits of a BSQ tokenizer, so vocab_size must be 2**z_channels "
             f"(vocab_size {self.vocab_size}, z_channels {self.z_channels})")
        need(self.head != "bitwise" or self.order == "scale", "head", "'bitwise' needs order='scale'")
        need(self.input_resize in INPUT_RESIZES, "input_resize", f"must be one of {INPUT_RESIZES}")
        need(self.mlp_ratio > 0 and round(self.width * self.mlp_ratio) >= 1, "mlp_ratio", "must be > 0")
        need(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "must be in [0, 1)")
        need(0.0 <= self.cond_drop_rate < 1.0, "cond_drop_rate", "must be in [0, 1)")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.init_std > 0, "init_std", "must be > 0 once resolved")
        need(self.remat in REMAT_MODES, "remat", f"must be one of {REMAT_MODES}")
        need(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"must be one of {COMPUTE_DTYPES}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"must be one of {ATTENTION_IMPLS}")
        return self


def check_tokenizer_pairing(head: str, order: str, tokenizer_cfg) -> None:
    """ValueError naming the field when a transformer with this head and order cannot read the tokenizer's tokens:
    a bitwise head needs a BSQ tokenizer (quantizer 'bsq'), and raster order a VQ one."""
    quantizer = getattr(tokenizer_cfg, "quantizer", "vq")
    if head == "bitwise" and quantizer != "bsq":
        raise ValueError(f"VARConfig.head: 'bitwise' predicts the bits of a BSQ tokenizer (quantizer='bsq'); this "
                         f"tokenizer's quantizer is {quantizer!r}")
    if order == "raster" and quantizer != "vq":
        raise ValueError(f"VARConfig.order: 'raster' reads a VQ codebook; this tokenizer's quantizer is {quantizer!r}")


def preset(depth: int, **overrides) -> VARConfig:
    """The reference model family (d6 … d36 in the paper; any depth >= 1 follows the same rule): C = 64·depth,
    heads = depth, drop-path 0.1·depth/24, and the README's init_adaln_gamma for the released depths.
    depth 36 is the released 512 px model (shared AdaLN)."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"preset: depth must be a positive int, got {depth!r}")
    kwargs: dict[str, Any] = {"depth": depth}
    if depth in RECIPE_INIT_ADALN_GAMMA:
        kwargs["init_adaln_gamma"] = RECIPE_INIT_ADALN_GAMMA[depth]
    if depth == 36:
        kwargs.update(shared_aln=True, patch_nums=PATCH_NUMS_512)
    kwargs.update(overrides)
    return VARConfig(**kwargs)
