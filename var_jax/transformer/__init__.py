"""The VAR transformer: config, model (teacher forcing + KV-cached inference), reference checkpoint conversion, and
bitwise_head.py (Infinity's per-bit head read out: logits per bit, its loss)."""
from var_jax.scale_config import PATCH_NUMS_256, PATCH_NUMS_512
from var_jax.transformer.config import RunSettings, VARConfig, preset
from var_jax.transformer.model import VAR

__all__ = ["VARConfig", "RunSettings", "preset", "VAR", "PATCH_NUMS_256", "PATCH_NUMS_512"]
