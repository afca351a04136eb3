"""Hyper-parameters of the multi-scale residual VQ tokenizer (VQVAE).

Defaults are the released tokenizer `vae_ch160v4096z32.pth` at 256 px (VAR_REFERENCE.md §1).
"""
from __future__ import annotations

import dataclasses

from var_jax.scale_config import PATCH_NUMS_256, ScaleScheduleConfig

# GroupNorm in every encoder/decoder block uses 32 groups (the reference's `Normalize`).
NORM_GROUPS = 32
# |quant_resi| at or below this makes Phi the identity (the reference's threshold).
IDENTITY_PHI_THRESHOLD = 1e-6


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

    def __post_init__(self):
        # JSON and argparse give lists; tuples keep the config hashable (a jit static argument).
        for name in ("ch_mult", "patch_nums", "attn_levels"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(int(v) for v in value))

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
        return abs(self.quant_resi) <= IDENTITY_PHI_THRESHOLD

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
