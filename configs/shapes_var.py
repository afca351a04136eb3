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

# lr = tblr · batch / 256 (the reference has no depth rule): 4e-4 at batch 32 for minutes-long CPU runs
TBLR = 3.2e-3


def get_config(arg=None):
    arg = config_base.parse_arg(arg, depth=2, batch=32, steps=1000, image_size=32, latent=4, tblr=TBLR)
    config = config_base.base_config("var")
    config.total_steps = arg.steps
    config.batch_size = arg.batch
    config.log_every = 20
    config.checkpoint_every = 500
    config.sample_every = 0                    # sweeps compare losses; sample from the exported model instead
    config.patch_nums = config_base.small_patch_nums(arg.latent)
    config.tokenizer_checkpoint = "workdirs/shapes_tokenizer"
    config.data = config_base.data_config(name="shapes", image_size=arg.image_size, split="train")
    config.model = config_base.var_model_config(arg.depth, drop_path_rate=0.0, init_adaln_gamma=1e-3)
    config.optim = config_base.optim_config(tblr=arg.tblr, warmup_fraction=0.05)
    return config
