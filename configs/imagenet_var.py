"""The reference VAR recipes on ImageNet 256 px (VAR_REFERENCE.md §4), by depth.

    python -m var_jax train --config configs/imagenet_var.py:depth=16,data_path=/data/imagenet/train \
        --workdir gs://bucket/var_d16 --config.tokenizer_checkpoint=checkpoints/vae_ch160v4096z32

ARG keys: depth (16, 20, 24, 30), batch (global; default the recipe's), epochs (default the recipe's),
data_path (an ImageFolder root; or set --config.data.name=tfds --config.data.tfds_name=imagenet2012),
fsdp (FSDP size within a slice, the rest data parallel; default -1: every device of the slice),
slices (TPU slices of a multi-slice job, data parallel across them: mesh_dcn = (slices, 1, 1); default 1).

FSDP splits a weight only over a device count that divides one of its dimensions, and the widths 64·depth split
evenly only up to d16: 1024, d20: 256, d24: 512, d30: 128 devices (1920 = 128·15). On more devices per slice
than that, give fsdp=that size (d30 on 512 chips: fsdp=128 -> mesh (4, 128, 1)); with fsdp=-1 the run says at
start which weights stay whole on every device and what they cost.

    python -m var_jax train --config configs/imagenet_var.py:depth=30,fsdp=128,slices=2,data_path=... ...
"""
from var_jax.train import config_base
from var_jax.scale_config import PATCH_NUMS_256

IMAGENET_TRAIN_IMAGES = 1_281_167

# depth -> (global batch, epochs, tblr, wpe, twde, alng): the README training commands.
RECIPES = {
    16: (768, 200, 1e-4, 0.1, 0.05, 1e-3),
    20: (768, 250, 1e-4, 0.1, 0.05, 1e-3),
    24: (768, 350, 8e-5, 0.01, 0.05, 1e-4),
    30: (1024, 350, 8e-5, 0.01, 0.08, 1e-5),
}


def get_config(arg=None):
    arg = config_base.parse_arg(arg, depth=16, batch=-1, epochs=-1, data_path="", fsdp=-1, slices=1)
    if arg.depth not in RECIPES:
        raise ValueError(f"imagenet_var: depth must be one of {sorted(RECIPES)}, got {arg.depth}")
    batch, epochs, tblr, wpe, twde, alng = RECIPES[arg.depth]
    batch = batch if arg.batch <= 0 else arg.batch
    epochs = epochs if arg.epochs <= 0 else arg.epochs

    config = config_base.base_config("var")
    config.batch_size = batch
    config.total_steps = epochs * (IMAGENET_TRAIN_IMAGES // batch)
    config.log_every = 100
    config.checkpoint_every = 5000
    config.sample_every = 20000
    width = 64 * arg.depth
    if arg.fsdp == 0 or arg.fsdp < -1 or (arg.fsdp > 0 and width % arg.fsdp):
        raise ValueError(f"imagenet_var: fsdp must be -1 or divide the d{arg.depth} width {width}, got {arg.fsdp}")
    if arg.slices < 1:
        raise ValueError(f"imagenet_var: slices must be >= 1, got {arg.slices}")
    # FSDP: d30 (2B params + Adam) does not fit replicated; data parallel over the rest and across slices
    config.mesh = (1, -1, 1) if arg.fsdp == -1 else (-1, arg.fsdp, 1)
    config.mesh_dcn = (arg.slices, 1, 1)
    config.tokenizer_checkpoint = ""
    config.patch_nums = PATCH_NUMS_256
    config.data = config_base.data_config(name="folder", path=arg.data_path, image_size=256, worker_count=8)
    config.model = config_base.var_model_config(arg.depth, init_adaln_gamma=alng, remat="block")
    config.optim = config_base.optim_config(tblr=tblr, wpe=wpe, wd=0.05, wd_end=twde, warmup_fraction=1 / 50)
    return config
