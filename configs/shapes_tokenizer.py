"""A small multi-scale VQ tokenizer for the procedural shapes dataset (var_jax/data/shapes.py; no download, no
end of data): stage 1 of the scaling sweeps.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python -m var_jax train --config configs/shapes_tokenizer.py:latent=8,image_size=64 --workdir workdirs/shapes64_tok

Modelled on configs/digits_tokenizer.py. `latent` is the side of the last token map: 4 (default; patch_nums
(1,2,3,4), L = 30 tokens, cheap enough for CPU sweeps) or 8 (patch_nums (1,2,3,4,6,8), L = 130); the encoder
downsamples image_size / latent, one ch_mult level per factor 2. Shapes carry arbitrary colours, so the latent
has more channels than digits'. configs/shapes_var.py takes the same `latent` and `image_size`.
"""
import math

import ml_collections

from configs import common

# token-map sides per latent size: the digits demo's schedule for 4, extended the reference's way for 8
PATCH_NUMS = {4: (1, 2, 3, 4), 8: (1, 2, 3, 4, 6, 8)}


def patch_nums(latent: int) -> tuple[int, ...]:
    if latent not in PATCH_NUMS:
        raise ValueError(f"config argument latent: must be one of {sorted(PATCH_NUMS)}, got {latent}")
    return PATCH_NUMS[latent]


def ch_mult(image_size: int, latent: int) -> tuple[int, ...]:
    """Channel multipliers for a downsampling of image_size / latent (a power of two): (1, 1, 2, 2, ...)."""
    factor = image_size // latent
    if factor < 2 or image_size % latent or factor & (factor - 1):
        raise ValueError(f"config arguments image_size={image_size}, latent={latent}: image_size / latent must be "
                         "a power of two >= 2")
    levels = int(math.log2(factor)) + 1
    return tuple(1 if i < levels // 2 else 2 for i in range(levels))


def get_config(arg=None):
    arg = common.parse_arg(arg, batch=32, steps=1000, lr=2e-3, image_size=32, latent=4, vocab=512)
    config = common.base_config("tokenizer")
    config.total_steps = arg.steps
    config.batch_size = arg.batch
    config.log_every = 50
    config.checkpoint_every = 500
    config.sample_every = 500          # PNG grid: originals, then their reconstructions
    config.patch_nums = patch_nums(arg.latent)
    config.tokenizer_checkpoint = ""
    config.data = common.data_config(name="shapes", image_size=arg.image_size, split="train")
    config.tokenizer = ml_collections.ConfigDict(dict(
        vocab_size=arg.vocab, z_channels=16, ch=32, ch_mult=ch_mult(arg.image_size, arg.latent), num_res_blocks=1,
        attn_levels=(), quant_conv_ks=3, beta=0.25, quant_resi=0.5, share_quant_resi=4, using_znorm=False,
        dropout=0.0))
    config.loss = ml_collections.ConfigDict(dict(
        recon_kind="l1", recon_weight=1.0, vq_weight=1.0, lpips_weight=0.0,
        disc_weight=0.0, gan_kind="hinge", disc_start=0, adaptive_disc_weight=True,
        restart_every=0, restart_threshold=1.0))
    config.discriminator = ml_collections.ConfigDict(dict(base_channels=32, num_layers=2))
    config.lpips = ml_collections.ConfigDict(dict(vgg_path="", lin_path=""))
    # lr = tblr * batch / 256 in the shared recipe; no weight decay for the tokenizer.
    tblr = arg.lr * 256 / arg.batch
    config.optim = common.optim_config(tblr=tblr, warmup_steps=20, wd=0.0, wd_end=0.0)
    config.disc_optim = common.optim_config(tblr=tblr, b1=0.5, b2=0.9, warmup_steps=0, schedule="constant",
                                            wd=0.0, wd_end=0.0)   # VQGAN's Adam betas for the discriminator
    return config
