"""A small multi-scale VQ tokenizer for the embedded digits dataset (no download): stage 1 of the digits demo.

    python -m var_jax train --config configs/digits_tokenizer.py --workdir workdirs/digits_tokenizer
    python -m var_jax train --config configs/digits_tokenizer.py:steps=4,batch=8 --workdir /tmp/t \
        --config.mesh='(2,2,2)'

32 px images -> 4x4x16 latent (ch_mult (1,1,2,2): downsampling 8), patch_nums (1,2,3,4) as configs/digits_var.py
expects (L=30 tokens keep the VAR stage of the 15-minute CPU demo cheap), V=256. L1 reconstruction + the
quantizer's VQ loss; the GAN (loss.disc_weight > 0) and LPIPS
(loss.lpips_weight > 0 with lpips.vgg_path / lpips.lin_path) are off by default: digits need neither.
The exported model is WORKDIR/model (the VAR stage's `tokenizer_checkpoint`).
"""
import ml_collections

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, batch=32, steps=300, lr=2e-3, image_size=32, vocab=256)
    config = common.base_config("tokenizer")
    config.total_steps = arg.steps
    config.batch_size = arg.batch
    config.log_every = 50
    config.checkpoint_every = 200
    config.sample_every = 200          # PNG grid: originals, then their reconstructions
    config.patch_nums = (1, 2, 3, 4)
    config.tokenizer_checkpoint = ""   # warm start from a converted tokenizer / earlier run (its shape wins)
    config.data = common.data_config(name="digits", image_size=arg.image_size)
    config.tokenizer = ml_collections.ConfigDict(dict(
        vocab_size=arg.vocab, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
        attn_levels=(),            # the mid blocks still attend at 4x4; no per-level attention
        quant_conv_ks=3, beta=0.25, quant_resi=0.5, share_quant_resi=4, using_znorm=False, dropout=0.0))
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
