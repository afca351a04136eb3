"""A small multi-scale VQ tokenizer for the embedded digits dataset (no download): stage 1 of the digits demo.

    python -m var_jax train --config configs/digits_tokenizer.py --workdir workdirs/digits_tokenizer
    python -m var_jax train --config configs/digits_tokenizer.py:steps=4,batch=8 --workdir /tmp/t \
        --config.mesh='(2,2,2)'

32 px images -> 4x4x16 latent (ch_mult (1,1,2,2): downsampling 8), patch_nums (1,2,3,4) as configs/digits_var.py
expects (L=30 tokens keep the VAR stage of the 15-minute CPU demo cheap), V=256. The recipe (L1 + VQ loss, no GAN
or LPIPS) is var_jax/train/config_base.py's small_tokenizer_config.
The exported model is WORKDIR/model (the VAR stage's `tokenizer_checkpoint`).
"""
from var_jax.train import config_base


def get_config(arg=None):
    arg = config_base.parse_arg(arg, batch=32, steps=300, lr=2e-3, image_size=32, vocab=256)
    return config_base.small_tokenizer_config(
        batch=arg.batch, steps=arg.steps, lr=arg.lr, vocab=arg.vocab,
        data=config_base.data_config(name="digits", image_size=arg.image_size),
        patch_nums=(1, 2, 3, 4), ch_mult=(1, 1, 2, 2))
