"""VAR on the procedural shapes dataset (var_jax/data/shapes.py): the model family of the scaling sweeps.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python -m var_jax train --config configs/shapes_var.py:depth=4 --workdir workdirs/shapes_var_d4 \
        --config.tokenizer_checkpoint=workdirs/shapes_tokenizer
    python launch/sweep.py --config configs/shapes_var.py --depths 2,3,4,5 --sweep-dir workdirs/shapes_sweep

The model follows the reference shape rule (width 64·depth, heads = depth; model.width / model.heads are -1,
i.e. derived), so `depth` alone picks a member of the family; `latent` and `image_size` must match the
tokenizer's (configs/shapes_tokenizer.py). The data never repeats within a run, and the held-out split ('val',
never trained on) is what a held-out evaluation should read.
"""
from var_jax.train import config_base

def get_config(arg=None):
    arg = config_base.parse_arg(arg, depth=2, batch=32, steps=1000, image_size=32, latent=8, tblr=config_base.SHAPES_VAR_TBLR)
    return config_base.shapes_var_config(arg, config_base.small_patch_nums(arg.latent), "workdirs/shapes_tokenizer")
