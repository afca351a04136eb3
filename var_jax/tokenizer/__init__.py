"""The multi-scale residual VQ tokenizer (VQVAE) of VAR.

config.py     TokenizerConfig, the hyper-parameters
resize.py     PyTorch-exact `area` / `bicubic` resampling (NHWC)
vqvae.py      Encoder, Decoder, VQVAE (the parameters) and image <-> token wrappers
quantizer.py  the multi-scale quantization recursion as pure functions of `VQVAE.quantizer_params()`
bsq.py        Infinity's binary spherical quantizer (quantizer='bsq'): bits, codes, its recursion and losses
convert.py    reference PyTorch state_dict <-> VQVAE
"""
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE, image_to_tokens, tokens_to_image

__all__ = ["TokenizerConfig", "VQVAE", "image_to_tokens", "tokens_to_image"]
