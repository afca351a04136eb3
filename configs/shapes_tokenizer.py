"""A small multi-scale VQ tokenizer for the procedural shapes dataset (var_jax/data/shapes.py; no download, no
end of data): stage 1 of the scaling sweeps.

    python -m var_jax train --config configs/shapes_tokenizer.py --workdir workdirs/shapes_tokenizer
    python -m var_jax train --config configs/shapes_tokenizer.py:latent=8,image_size=64 --workdir workdirs/shapes64_tok

Modelled on configs/digits_tokenizer.py. `latent` is the side of the last token map: 4 (default; patch_nums
(1,2,3,4), L = 30 tokens, cheap enough for CPU sweeps) or 8 (patch_nums (1,2,3,4,6,8), L = 130); the encoder
downsamples image_size / latent, one ch_mult level per factor 2; the vocabulary is larger than digits' (shapes
carry arbitrary colours). configs/shapes_var.py takes the same `latent` and `image_size`.
"""
import math

from configs import common
from configs import digits_tokenizer

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
    # digits' recipe (L1 + VQ loss, no GAN or LPIPS, lr = tblr·batch/256, no weight decay) on shapes
    config = digits_tokenizer.get_config(f"batch={arg.batch},steps={arg.steps},lr={arg.lr},"
                                         f"image_size={arg.image_size},vocab={arg.vocab}")
    config.checkpoint_every = 500
    config.sample_every = 500          # PNG grid: originals, then their reconstructions
    config.patch_nums = patch_nums(arg.latent)
    config.data = common.data_config(name="shapes", image_size=arg.image_size, split="train")
    config.tokenizer.ch_mult = ch_mult(arg.image_size, arg.latent)
    return config
