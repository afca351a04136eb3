"""VAR on the embedded digits dataset (no download): a small transformer, minutes on a CPU.

    python -m var_jax train --config configs/digits_var.py --workdir workdirs/digits_var \
        --config.tokenizer_checkpoint=workdirs/digits_tokenizer
    python -m var_jax train --config configs/digits_var.py:depth=2,batch=16 --workdir /tmp/v \
        --config.tokenizer_checkpoint=workdirs/digits_tokenizer --config.total_steps=4 --config.mesh='(2,2,2)'

The tokenizer (stage 1) must have the same patch_nums, ending at image_size / its downsampling factor.
"""
from var_jax.train import config_base


def get_config(arg=None):
    arg = config_base.parse_arg(arg, depth=4, width=128, batch=32, steps=1500, image_size=32)
    config = config_base.base_config("var")
    config.total_steps = arg.steps
    config.batch_size = arg.batch
    config.log_every = 20
    config.checkpoint_every = 500
    config.sample_every = 1000
    config.eval_every = 500                    # held-out digits (360 images): well under 1% of the demo's time
    config.patch_nums = (1, 2, 3, 4)           # the digits tokenizer's 4x4 latent: L = 30 tokens
    config.tokenizer_checkpoint = "workdirs/digits_tokenizer"
    config.data = config_base.data_config(name="digits", image_size=arg.image_size)
    # small model: width and heads set explicitly (the depth->width rule gives 256 at depth 4)
    config.model = config_base.var_model_config(arg.depth, width=arg.width, heads=max(arg.width // 64, 1),
                                                drop_path_rate=0.0, init_adaln_gamma=1e-3)
    # lr = tblr * batch / 256 = 1e-3 at batch 32: a tiny model trained for minutes takes a high rate
    config.optim = config_base.optim_config(tblr=8e-3, warmup_fraction=0.05)
    return config
