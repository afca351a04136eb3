"""A small multi-scale VQ tokenizer for the procedural shapes dataset (var_jax/data/shapes.py; no download, no
end of data): stage 1 of the scaling sweeps.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python -m var_jax train --config configs/shapes_tokenizer.py:latent=8,image_size=64 --workdir workdirs/shapes64_tok

The recipe of configs/digits_tokenizer.py (config_base.small_tokenizer_config). `latent` is the side of the last
token map: 4 (default; patch_nums (1,2,3,4), L = 30 tokens, cheap enough for CPU sweeps) or 8 (patch_nums
(1,2,3,4,6,8), L = 130); the encoder downsamples image_size / latent, one ch_mult level per factor 2; the vocabulary is larger than digits' (shapes
carry arbitrary colours). configs/shapes_var.py takes the same `latent` and `image_size`.
"""
from var_jax.train import config_base


def get_config(arg=None):
    arg = config_base.parse_arg(arg, batch=32, steps=1000, lr=2e-3, image_size=32, latent=4, vocab=512)
    return config_base.shapes_tokenizer_config(arg, config_base.small_patch_nums(arg.latent))
