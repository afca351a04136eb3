"""The raster-order AR baseline on the procedural shapes data (the paper's "AR" row of Table 3): a single-scale
tokenizer (the same VQVAE with patch_nums (latent,): one residual step, i.e. a plain VQ) and the same transformer
with order='raster' (token-causal mask, next-token training, token-by-token KV-cached sampling).

    python -m var_jax train --config configs/shapes_raster.py:stage=tokenizer --workdir workdirs/shapes_raster_tokenizer
    python -m var_jax train --config configs/shapes_raster.py:depth=4 --workdir workdirs/shapes_raster_d4 \\
        --config.tokenizer_checkpoint=workdirs/shapes_raster_tokenizer
    python -m var_jax sample --model workdirs/shapes_raster_d4/model ...   (the sampler dispatches on the order)

Arguments as configs/shapes_tokenizer.py (stage=tokenizer: batch, steps, lr, vocab, image_size, latent) and
configs/shapes_var.py (stage=var: depth, batch, steps, image_size, latent, tblr); `adaln=false` gives the raster
baseline without AdaLN. With latent 4 the sequence has 16 tokens (VAR's (1,2,3,4) has 30), with the same
parameters but for the position embeddings.
"""
from var_jax.train import config_base

def get_config(arg=None):
    arg = config_base.parse_arg(arg, stage="var", depth=2, batch=32, steps=1000, lr=2e-3, vocab=512, image_size=32,
                                latent=4, tblr=config_base.SHAPES_VAR_TBLR, adaln=True)
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
