"""var-jax: VAR (next-scale prediction) in JAX / Flax NNX.

The sub-packages follow the data flow:
  data -> tokenizer -> transformer -> train -> sample -> eval
"""
import importlib.metadata as _metadata
import os as _os

# CPU convolutions: XLA's own kernels instead of YNNPACK's. Measured on the project's 2-core x86 machine (jaxlib
# 0.10.2): a 3x3 conv at 256x256x160 runs at ~340 instead of ~290 GFLOP/s, a batch of four 128x128 maps at ~340
# instead of ~195, and the tokenizer's decode is ~12 % faster. Set before JAX creates its CPU backend (XLA_FLAGS
# is read then); left alone when XLA_FLAGS already chooses YNN fusions, and outside the jaxlib versions tested
# (an unknown flag would abort XLA). Only XLA:CPU reads it.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
try:
    _tested_jaxlib = _metadata.version("jaxlib").startswith("0.10.")
except _metadata.PackageNotFoundError:
    _tested_jaxlib = False
if _tested_jaxlib and _YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_YNN_FLAG}=-individual_convolution".strip()

from flax import nnx as _nnx  # noqa: E402

# Parameters carry *logical* axis names (see var_jax/sharding.py); they are placed on devices explicitly at
# the jit boundary, never eagerly when a module is built.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
