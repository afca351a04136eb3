"""var-jax: VAR (next-scale prediction) in JAX / Flax NNX.

The sub-packages follow the data flow:
  data -> tokenizer -> transformer -> train -> sample -> eval
"""
from flax import nnx as _nnx

# Parameters carry *logical* axis names (see var_jax/sharding.py); they are placed on devices explicitly at
# the jit boundary, never eagerly when a module is built.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
