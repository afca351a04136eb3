"""What the training configs (configs/*.py) share: the argument-string parser, the fields every config has,
and the recipes more than one config builds on.

A config file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`; `arg` is the text after
the colon in `--config configs/NAME.py:ARG`, a comma-separated list of `key=value` (see `parse_arg`). Config
files import from here (the package), never from each other, so they load from any directory by path.
"""
from __future__ import annotations

import ast
import math

import ml_collections

from var_jax.scale_config import PATCH_NUMS_256

# Config fields added with Infinity's bitwise tokens, with their defaults (which compute what runs recorded before
# them computed: the resume guard, train/checkpointing.py, treats a missing one as its default)
ADDED_TOKENIZER_FIELDS = dict(quantizer="vq", bits=0, entropy_weight=0.1, inv_temperature=100.0)
ADDED_FIELDS = {"model": dict(head="index", input_resize="auto"), "loss": dict(bitwise_self_correction=0.0),
                "tokenizer": ADDED_TOKENIZER_FIELDS}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'depth=16,batch=768' -> ConfigDict, typed like `defaults`; an unknown key is an error."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r}: expected key=value with key one of {sorted(defaults)}")
        default = defaults[key]
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if isinstance(default, bool):
            parsed = str(value).lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)) and not isinstance(parsed, (int, float)):
            raise ValueError(f"config argument {key}: expected a number, got {value!r}")
        out[key] = type(default)(parsed) if isinstance(default, (int, float, str)) else parsed
    return out


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """The reference VAR recipe (VAR_REFERENCE.md §4; utils/arg_util.py defaults)."""
    cfg = ml_collections.ConfigDict(dict(
        tblr=1e-4,               # lr = tblr · batch / 256
        b1=0.9, b2=0.95, eps=1e-8,
        warmup_steps=-1,         # >= 0 overrides warmup_fraction
        warmup_fraction=0.02,    # the reference warms up for ep/50 epochs
        wp0=0.005,               # warmup starts at wp0 · lr
        wpe=0.1,                 # lin0 ends at wpe · lr (0.01 for d24+)
        schedule="auto",         # 'auto' (lin<progressive.fraction> with progressive training, else lin0) |
                                 # 'lin0' | 'lin<T>' (0 <= T <= 1) | 'constant'; see var_jax/train/optimizer.py
        wd=0.05, wd_end=0.05,    # weight decay: cosine from wd to wd_end (twde)
        grad_clip=2.0,           # global norm; <= 0 disables
    ))
    cfg.update(overrides)
    return cfg


def var_model_config(depth: int, **overrides) -> ml_collections.ConfigDict:
    """VAR transformer fields (var_jax.transformer.VARConfig). -1 / '' = derived: width, heads, drop-path and
    init_adaln_gamma from depth (transformer.preset); num_classes from the dataset; vocab and latent channels
    from the tokenizer."""
    cfg = ml_collections.ConfigDict(dict(
        depth=depth, width=-1, heads=-1, num_classes=-1, drop_path_rate=-1.0, init_adaln_gamma=-1.0,
        cond_drop_rate=0.1, shared_aln=False, attn_l2_norm=True, mlp_ratio=4.0, init_adaln=0.5, init_head=0.02,
        adaln=True, order="scale",             # ablations: plain LayerNorm / the raster-order AR baseline
        head="index", input_resize="auto",     # 'bitwise': Infinity's per-bit head (BSQ tokenizers); next-input resize
        remat="none", attention_impl="auto",   # run settings (transformer.RunSettings), free to change on resume
    ))
    cfg.update(overrides)
    return cfg


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Fields of var_jax.data.build_source / make_dataset ('' = unset). split / eval_split: the training and
    held-out splits, '' = the source's (data/sources.TRAIN_SPLITS / HELD_OUT_SPLITS: disjoint). dir / eval_dir:
    the token sets of name='tokens' (`use_token_sets`)."""
    cfg = ml_collections.ConfigDict(dict(name="digits", path="", tfds_name="", split="", eval_split="", data_dir="",
                                         image_size=32, hflip=False, worker_count=0, dir="", eval_dir=""))
    cfg.update(overrides)
    return cfg


def use_token_sets(config: ml_collections.ConfigDict, directory: str,
                   eval_directory: str = "") -> ml_collections.ConfigDict:
    """The VAR stage reads `var-jax tokenize` outputs instead of images (data/tokens.py): `directory` for training,
    `eval_directory` (optional) for the held-out evaluation; the same as --config.data.name=tokens
    --config.data.dir=DIR --config.data.eval_dir=DIR_VAL."""
    config.data.name, config.data.dir, config.data.eval_dir = "tokens", directory, eval_directory
    return config


def base_config(stage: str = "var") -> ml_collections.ConfigDict:
    """Fields every config has; the config files fill in the values."""
    return ml_collections.ConfigDict(dict(
        stage=stage,                 # 'tokenizer' | 'var'
        seed=0,
        total_steps=1000,
        batch_size=64,               # global batch, over every host and device
        grad_accum_steps=1,          # micro-batches per update, in one jitted step (train/grad_accum.py); the lr
                                     # is the global batch's; batch_size must divide by it × data-parallel devices
        log_every=10,
        checkpoint_every=500,
        keep_checkpoints=3,
        sample_every=0,              # steps between PNG sample grids (0 = off)
        eval_every=-1,               # steps between held-out evaluations and at the end (-1: checkpoint_every, 0: off)
        eval_batch_size=0,           # global batch of the held-out evaluation (0 = batch_size)
        eval_class_dropout=False,    # VAR: drop class labels at cond_drop_rate in evaluation too, as the reference does
        max_nonfinite_steps=20,      # stop after this many steps in a row with a non-finite loss or gradient
        num_sample_images=16,
        mesh=(-1, 1, 1),             # (data, fsdp, tensor); one size may be -1
        mesh_dcn=(1, 1, 1),          # (data, fsdp, tensor) across TPU slices (var_jax/mesh.py); `mesh` is then per
                                     # slice; only data may exceed 1; one size may be -1 (= the slice count)
        sharding_rules=(),           # (logical axis, mesh axes) pairs over sharding.LOGICAL_AXIS_RULES, e.g.
                                     # (('embed', ('fsdp', 'tensor')), ('mlp', None)); None = replicated
        compute_dtype="auto",        # 'auto' (bfloat16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16'
        peak_flops=0.0,              # per-device peak FLOP/s for MFU in the logs (0 = unknown)
        profile_steps="",            # 'START:END': a jax.profiler trace of steps START..END-1 in WORKDIR/profiles
                                     # ('' = off; train/diagnosis.py)
        compile_cache_dir="",        # JAX's persistent compilation cache: '' = WORKDIR/compile_cache (or the one
                                     # JAX_COMPILATION_CACHE_DIR names), a directory, or 'none' = off
        tokenizer_checkpoint="",     # var stage: a model dir, or a tokenizer training workdir (uses WORKDIR/model)
        patch_nums=PATCH_NUMS_256,
        data=data_config(),
        optim=optim_config(),
        # bitwise_self_correction: Infinity's flip probability p for BSQ tokenizers (train/var/self_correction.py)
        loss=ml_collections.ConfigDict(dict(label_smoothing=0.0, scale_weights=(), bitwise_self_correction=0.0)),
        # VAR progressive training (train/var/progressive.py): the reference's pg, pg0 and pgwp in steps;
        # ramp_steps -1 = derived, the reference's pgwp default (ep/300 epochs = total_steps/300 steps)
        progressive=ml_collections.ConfigDict(dict(fraction=0.0, start_scale=4, ramp_steps=-1.0)),
    ))


def small_tokenizer_config(*, batch: int, steps: int, lr: float, vocab: int, data: ml_collections.ConfigDict,
                           patch_nums: tuple[int, ...], ch_mult: tuple[int, ...]) -> ml_collections.ConfigDict:
    """The small multi-scale VQ tokenizer recipe of the digits and shapes configs: L1 reconstruction + the
    quantizer's VQ loss; the GAN (loss.disc_weight > 0) and LPIPS (loss.lpips_weight > 0 with lpips.vgg_path /
    lpips.lin_path) are off: small synthetic images need neither. lr is the rate at this batch."""
    config = base_config("tokenizer")
    config.total_steps = steps
    config.batch_size = batch
    config.log_every = 50
    config.checkpoint_every = 200
    config.sample_every = 200          # PNG grid: originals, then their reconstructions
    config.patch_nums = patch_nums
    config.tokenizer_checkpoint = ""   # warm start from a converted tokenizer / earlier run (its shape wins)
    config.data = data
    config.tokenizer = ml_collections.ConfigDict(dict(
        vocab_size=vocab, z_channels=16, ch=32, ch_mult=ch_mult, num_res_blocks=1,
        attn_levels=(),            # the mid blocks still attend at the last latent size; no per-level attention
        quant_conv_ks=3, beta=0.25, quant_resi=0.5, share_quant_resi=4, using_znorm=False, dropout=0.0,
        # quantizer='bsq': Infinity's bitwise quantizer with `bits` bits (vocab_size and z_channels then follow
        # from bits); entropy_weight and inv_temperature are its entropy penalty's (var_jax/tokenizer/bsq.py)
        **ADDED_TOKENIZER_FIELDS))
    config.loss = ml_collections.ConfigDict(dict(
        recon_kind="l1", recon_weight=1.0, vq_weight=1.0, lpips_weight=0.0,
        disc_weight=0.0, gan_kind="hinge", disc_start=0, adaptive_disc_weight=True,
        restart_every=0, restart_threshold=1.0))
    config.discriminator = ml_collections.ConfigDict(dict(base_channels=32, num_layers=2))
    config.lpips = ml_collections.ConfigDict(dict(vgg_path="", lin_path=""))
    # lr = tblr * batch / 256 in the shared recipe; no weight decay for the tokenizer.
    tblr = lr * 256 / batch
    config.optim = optim_config(tblr=tblr, warmup_steps=20, wd=0.0, wd_end=0.0)
    config.disc_optim = optim_config(tblr=tblr, b1=0.5, b2=0.9, warmup_steps=0, schedule="constant",
                                     wd=0.0, wd_end=0.0)   # VQGAN's Adam betas for the discriminator
    return config


def shapes_tokenizer_config(arg: ml_collections.ConfigDict, patch_nums: tuple[int, ...]) -> ml_collections.ConfigDict:
    """The shapes tokenizer (configs/shapes_tokenizer.py, configs/shapes_raster.py) from its parsed config
    arguments (batch, steps, lr, vocab, cvae, image_size, latent) and token-map sides."""
    config = small_tokenizer_config(
        batch=arg.batch, steps=arg.steps, lr=arg.lr, vocab=arg.vocab,
        data=data_config(name="shapes", image_size=arg.image_size, split="train"),
        patch_nums=patch_nums, ch_mult=downsampling_ch_mult(arg.image_size, arg.latent))
    config.tokenizer.z_channels = arg.cvae
    config.checkpoint_every = 500
    config.sample_every = 500          # PNG grid: originals, then their reconstructions
    config.eval_every = SHAPES_TOKENIZER_EVAL_EVERY
    return config


# The shapes tokenizer recipe (docs/results/tokenizer_recipe.json): 8x8 latents (L = 130), 4096 codes of 32
# channels, 6000 steps of 32; the held-out pass every 1000 steps costs about a tenth of the steps between
SHAPES_TOKENIZER_RECIPE = dict(batch=32, steps=6000, lr=2e-3, image_size=32, latent=8, vocab=4096, cvae=32)
SHAPES_TOKENIZER_EVAL_EVERY = 1000


# lr = tblr · batch / 256 (the reference has no depth rule): 4e-4 at batch 32 for minutes-long CPU runs; the
# raster baseline (configs/shapes_raster.py) uses the same rate, so that the two orders compare at one recipe
SHAPES_VAR_TBLR = 3.2e-3


def shapes_var_config(arg: ml_collections.ConfigDict, patch_nums: tuple[int, ...],
                      tokenizer_checkpoint: str) -> ml_collections.ConfigDict:
    """The shapes VAR stage (configs/shapes_var.py, configs/shapes_raster.py) from its parsed config arguments
    (depth, batch, steps, image_size, tblr) and the tokenizer's token-map sides."""
    config = base_config("var")
    config.total_steps = arg.steps
    config.batch_size = arg.batch
    config.log_every = 20
    config.checkpoint_every = 500
    config.sample_every = 0                    # sweeps compare losses; sample from the exported model instead
    config.patch_nums = patch_nums
    config.tokenizer_checkpoint = tokenizer_checkpoint
    config.data = data_config(name="shapes", image_size=arg.image_size, split="train")
    config.model = var_model_config(arg.depth, drop_path_rate=0.0, init_adaln_gamma=1e-3)
    config.optim = optim_config(tblr=arg.tblr, warmup_fraction=0.05)
    return config


# token-map sides per last-latent size: the digits demo's schedule for 4, extended the reference's way for 8
SMALL_PATCH_NUMS = {4: (1, 2, 3, 4), 8: (1, 2, 3, 4, 6, 8)}


def small_patch_nums(latent: int) -> tuple[int, ...]:
    """patch_nums of a small tokenizer whose last token map is latent × latent (config argument `latent`)."""
    if latent not in SMALL_PATCH_NUMS:
        raise ValueError(f"config argument latent: must be one of {sorted(SMALL_PATCH_NUMS)}, got {latent}")
    return SMALL_PATCH_NUMS[latent]


def downsampling_ch_mult(image_size: int, latent: int) -> tuple[int, ...]:
    """Channel multipliers for a downsampling of image_size / latent (a power of two): (1, 1, 2, 2, ...)."""
    factor = image_size // latent
    if factor < 2 or image_size % latent or factor & (factor - 1):
        raise ValueError(f"config arguments image_size={image_size}, latent={latent}: image_size / latent must be "
                         "a power of two >= 2")
    levels = int(math.log2(factor)) + 1
    return tuple(1 if i < levels // 2 else 2 for i in range(levels))
