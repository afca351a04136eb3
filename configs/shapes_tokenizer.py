"""A small multi-scale VQ tokenizer for the procedural shapes dataset (var_jax/data/shapes.py; no download, no
end of data): stage 1 of the scaling sweeps.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python -m var_jax train --config configs/shapes_tokenizer.py:latent=8,image_size=64 --workdir workdirs/shapes64_tok

The recipe of configs/digits_tokenizer.py (config_base.small_tokenizer_config) at the sizes the shapes need
(config_base.SHAPES_TOKENIZER_RECIPE; the search behind it: docs/results/tokenizer_recipe_search.json): `latent`
is the side of the last token map, 8 (patch_nums (1,2,3,4,6,8), L = 130 tokens; 4 gives (1,2,3,4), L = 30, whose
reconstructions the shapes classifier cannot read); the encoder downsamples image_size / latent, one ch_mult
level per factor 2; 4096 codes of `cvae` = 32 channels (shapes carry arbitrary colours); 6000 steps of 32.
configs/shapes_var.py takes the same `latent` and `image_size`.
"""
from var_jax.train import config_base


def get_config(arg=None):
    arg = config_base.parse_arg(arg, **config_base.SHAPES_TOKENIZER_RECIPE)
    return config_base.shapes_tokenizer_config(arg, config_base.small_patch_nums(arg.latent))
