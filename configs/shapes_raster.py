"""The raster-order AR baseline on the procedural shapes data (the paper's "AR" row of Table 3): a single-scale
tokenizer (the same VQVAE with patch_nums (latent,): one residual step, i.e. a plain VQ) and the same transformer
with order='raster' (token-causal mask, next-token training, token-by-token KV-cached sampling).

    python -m var_jax train --config configs/shapes_raster.py:stage=tokenizer --workdir workdirs/shapes_raster_tokenizer
    python -m var_jax train --config configs/shapes_raster.py:depth=4 --workdir workdirs/shapes_raster_d4 \\
        --config.tokenizer_checkpoint=workdirs/shapes_raster_tokenizer
    python -m var_jax sample --model workdirs/shapes_raster_d4/model ...   (the sampler dispatches on the order)

Arguments as configs/shapes_tokenizer.py (stage=tokenizer: batch, steps, lr, vocab, cvae, image_size, latent;
the same recipe, so both rows of Table 3 start from equal tokenizers) and configs/shapes_var.py (stage=var:
depth, batch, steps, image_size, latent, tblr); `adaln=false` gives the raster baseline without AdaLN. With
latent 8 the sequence has 64 tokens (VAR's (1,2,3,4,6,8) has 130), with the same parameters but for the position
embeddings.
"""
from var_jax.train import config_base

def get_config(arg=None):
    # steps 0 = the stage's own: the multi-scale tokenizer's recipe for stage=tokenizer, 1000 for the transformer
    arg = config_base.parse_arg(arg, stage="var", depth=2, **{**config_base.SHAPES_TOKENIZER_RECIPE, "steps": 0},
                                tblr=config_base.SHAPES_VAR_TBLR, adaln=True)
    if arg.steps == 0:
        arg.steps = config_base.SHAPES_TOKENIZER_RECIPE["steps"] if arg.stage == "tokenizer" else 1000
    patch_nums = (arg.latent,)
    if arg.stage == "tokenizer":
        config = config_base.shapes_tokenizer_config(arg, patch_nums)
        config.tokenizer.share_quant_resi = 1   # one scale uses one Phi
        return config
    if arg.stage != "var":
        raise ValueError(f"config argument stage: must be 'tokenizer' or 'var', got {arg.stage!r}")
    config = config_base.shapes_var_config(arg, patch_nums, "workdirs/shapes_raster_tokenizer")
    config.model.order = "raster"
    config.model.adaln = arg.adaln
    return config
