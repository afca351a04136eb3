"""Hyper-parameters of the multi-scale residual tokenizer (VQVAE).

Defaults are the released tokenizer `vae_ch160v4096z32.pth` at 256 px (VAR_REFERENCE.md §1). `quantizer='bsq'`
swaps VAR's codebook for Infinity's binary spherical quantizer (tokenizer/bsq.py): `bits` signs per position, a
vocabulary of 2^bits with nothing learned, z_channels == bits (Infinity's encoder emits the bits' channels, no
projection); with it z_channels and vocab_size may be left at -1 (derived from bits).
"""
from __future__ import annotations

import dataclasses

from var_jax.scale_config import PATCH_NUMS_256, ScaleScheduleConfig

# GroupNorm in every encoder/decoder block uses 32 groups (the reference's `Normalize`).
NORM_GROUPS = 32
# |quant_resi| at or below this makes Phi the identity (the reference's threshold).
IDENTITY_PHI_THRESHOLD = 1e-6
# 'vq': VAR's nearest-code search in a learned codebook, Phi convs; 'bsq': Infinity's binary spherical quantizer
QUANTIZERS = ("vq", "bsq")
# A BSQ token is its bits packed into one int32 id (tokenizer/bsq.py), so at most 31 bits.
MAX_BSQ_BITS = 31
# Fields that only the BSQ quantizer reads, with their defaults: left out of `to_dict` while at them, so that a VQ
# tokenizer's config (model directories, token sets, resume checks) reads exactly as before they existed.
BSQ_FIELDS = {"quantizer": "vq", "bits": 0, "entropy_weight": 0.1, "inv_temperature": 100.0}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(ScaleScheduleConfig):
    vocab_size: int = 4096
    z_channels: int = 32                  # Cvae, the latent (and codebook) width
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2               # encoder; the decoder has one more per level
    attn_levels: tuple[int, ...] | None = None   # levels with self-attention; None = the last one (reference)
    quant_conv_ks: int = 3
    beta: float = 0.25                    # commitment-loss weight
    quant_resi: float = 0.5               # Phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: int = 4             # number of Phi convs: 0 = one per scale, 1 = one shared, K = K shared
    using_znorm: bool = False             # cosine-similarity code search instead of L2
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    dropout: float = 0.0
    quantizer: str = "vq"                 # see QUANTIZERS
    bits: int = 0                         # bsq: bits per position (Infinity's codebook_dim d); vq: 0
    entropy_weight: float = 0.1           # bsq: weight of the entropy penalty (Infinity's entropy_weight)
    inv_temperature: float = 100.0        # bsq: sharpness of the soft bit probabilities in the entropy terms

    def __post_init__(self):
        # JSON and argparse give lists; tuples keep the config hashable (a jit static argument).
        for name in ("ch_mult", "patch_nums", "attn_levels"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(int(v) for v in value))
        # bsq: -1 (or None) derives the latent width and the vocabulary from the bits
        if self.quantizer == "bsq" and isinstance(self.bits, int) and 1 <= self.bits <= MAX_BSQ_BITS:
            for name, value in (("z_channels", self.bits), ("vocab_size", 2 ** self.bits)):
                if getattr(self, name) in (None, -1):
                    object.__setattr__(self, name, value)

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.latent_size * self.downsample

    @property
    def attention_levels(self) -> tuple[int, ...]:
        return (self.num_levels - 1,) if self.attn_levels is None else self.attn_levels

    @property
    def phi_is_identity(self) -> bool:
        """No Phi convs: |quant_resi| below the threshold, or the BSQ quantizer (which has none)."""
        return self.quantizer == "bsq" or abs(self.quant_resi) <= IDENTITY_PHI_THRESHOLD

    @property
    def num_phi(self) -> int:
        """How many Phi convs the quantizer holds (the leading axis of the stacked Phi parameters)."""
        if self.phi_is_identity:
            return 0
        if self.share_quant_resi == 0:
            return self.num_scales
        return self.share_quant_resi

    # ---- checks and (de)serialisation ---------------------------------------------------------------------
    def validate(self, image_size: int | None = None) -> "TokenizerConfig":
        """Raise ValueError naming the first inconsistent field; returns self so calls can be chained."""
        def fail(field, why):
            raise ValueError(f"TokenizerConfig.{field}: {why} (got {getattr(self, field)!r})")

        self._validate_quantizer(fail)   # first: with bsq, a bad `bits` is what leaves z_channels / vocab_size unset
        for field in ("vocab_size", "z_channels", "ch", "num_res_blocks", "quant_conv_ks"):
            if int(getattr(self, field)) < 1:
                fail(field, "must be a positive integer")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            fail("ch_mult", "must be a non-empty tuple of positive integers")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % NORM_GROUPS for w in widths):
            fail("ch", f"every level width ch*ch_mult = {widths} must be divisible by {NORM_GROUPS} (GroupNorm groups)")
        if any(not 0 <= lvl < self.num_levels for lvl in self.attention_levels):
            fail("attn_levels", f"levels must lie in [0, {self.num_levels})")
        if self.quant_conv_ks % 2 == 0:
            fail("quant_conv_ks", "must be odd (same-size padding)")
        if self.share_quant_resi < 0:
            fail("share_quant_resi", "must be >= 0")
        if self.beta < 0:
            fail("beta", "must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must lie in [0, 1)")
        if not self.patch_nums or any(pn < 1 for pn in self.patch_nums):
            fail("patch_nums", "must be a non-empty tuple of positive integers")
        if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            fail("patch_nums", "must be strictly increasing")
        if image_size is not None and image_size != self.image_size:
            fail("patch_nums", f"must end at the latent size {image_size}/{self.downsample} = "
                               f"{image_size / self.downsample:g} for {image_size} px images, "
                               f"which needs patch_nums[-1] * {self.downsample} == {image_size}")
        return self

    def _validate_quantizer(self, fail):
        if self.quantizer not in QUANTIZERS:
            fail("quantizer", f"must be one of {QUANTIZERS}")
        if self.quantizer == "vq":
            if self.bits != 0:
                fail("bits", "is read only with quantizer='bsq' (the vq tokenizer's vocabulary is vocab_size)")
            return
        if not isinstance(self.bits, int) or not 1 <= self.bits <= MAX_BSQ_BITS:
            fail("bits", f"must be an integer in [1, {MAX_BSQ_BITS}] with quantizer='bsq' (a token is its bits "
                         "packed into one int32 id)")
        if self.z_channels != self.bits:
            fail("z_channels", f"must equal bits={self.bits} with quantizer='bsq' (the encoder emits one channel per "
                               "bit, as Infinity's; -1 derives it)")
        if self.vocab_size != 2 ** self.bits:
            fail("vocab_size", f"must be 2**bits = {2 ** self.bits} with quantizer='bsq' (-1 derives it)")
        if self.entropy_weight < 0:
            fail("entropy_weight", "must be >= 0")
        if not self.inv_temperature > 0:
            fail("inv_temperature", "must be > 0")

    def to_dict(self):
        """JSON-safe fields; the BSQ-only fields are left out while at their defaults (see BSQ_FIELDS)."""
        return {k: v for k, v in super().to_dict().items() if not (k in BSQ_FIELDS and v == BSQ_FIELDS[k])}
