"""Convert reference PyTorch checkpoints (VQVAE, optionally VAR) into a var-jax model directory.

Examples:
  python -m var_jax convert --vae vae_ch160v4096z32.pth --out checkpoints/vae256
  python -m var_jax convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out checkpoints/var_d16
  python -m var_jax convert --vae vae_ch160v4096z32.pth --out checkpoints/vae512 --patch-nums 1,2,3,4,6,9,13,18,24,32

Inputs may be .pth/.pt (read with torch, weights only) or .npz with the reference key names. The scale schedule
(--patch-nums) is not stored in a VQVAE checkpoint: it defaults to the one a given --var was trained with, else
to the 256 px schedule.
"""
from __future__ import annotations

from var_jax.cli.common import CommandError, parse_int_list


def add_arguments(parser):
    parser.add_argument("--vae", required=True, help="reference VQVAE checkpoint (.pth, .pt or .npz)")
    parser.add_argument("--var", help="reference VAR checkpoint to convert as well (.pth, .pt or .npz)")
    parser.add_argument("--out", required=True, help="output model directory (must not exist unless --overwrite)")
    parser.add_argument("--patch-nums", help="comma-separated token-map sides, e.g. 1,2,3,4,5,6,8,10,13,16")
    parser.add_argument("--quant-resi", type=float, default=0.5,
                        help="Phi residual ratio r (not stored in the checkpoint; the released tokenizer uses 0.5)")
    parser.add_argument("--vae-key", help="entry holding the VQVAE state_dict inside --vae "
                                          "(dotted for .pth, e.g. trainer.vae_local; key prefix for .npz, e.g. vae)")
    parser.add_argument("--var-key", help="entry holding the VAR state_dict inside --var (as --vae-key)")
    parser.add_argument("--var-heads", type=int,
                        help="VAR attention heads; needed only for a checkpoint without attn_l2_norm (no "
                             "scale_mul_1H11) whose width is not 64 x heads (the released models never need it)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _param_count(model) -> int:
    import jax
    from flax import nnx
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def run(args):
    from var_jax.checkpoints import CheckpointError, read_state_dict, save_model_dir
    from var_jax.scale_config import REFERENCE_PATCH_NUMS
    from var_jax.tokenizer.convert import vqvae_from_state_dict

    patch_nums = parse_int_list(args.patch_nums, "--patch-nums") if args.patch_nums else None
    try:
        var_sd = read_state_dict(args.var, args.var_key) if args.var else None
        if patch_nums is None and var_sd is not None:
            from var_jax.transformer.convert import config_from_state_dict
            patch_nums = config_from_state_dict(var_sd, heads=args.var_heads).patch_nums
        tok_cfg, tokenizer = vqvae_from_state_dict(read_state_dict(args.vae, args.vae_key),
                                                   patch_nums=patch_nums or REFERENCE_PATCH_NUMS[256],
                                                   quant_resi=args.quant_resi)
        var = None
        if var_sd is not None:
            from var_jax.transformer.convert import var_from_state_dict
            var = var_from_state_dict(var_sd, tok_cfg, heads=args.var_heads)
        out = save_model_dir(args.out, tokenizer=(tok_cfg, tokenizer), var=var, overwrite=args.overwrite)
    except KeyError as e:   # str() of a KeyError is its repr, quotes and all
        raise CommandError(e.args[0] if e.args else str(e)) from None
    except (CheckpointError, ValueError) as e:
        raise CommandError(str(e)) from None

    print(f"tokenizer: {_param_count(tokenizer):,} parameters, V={tok_cfg.vocab_size}, Cvae={tok_cfg.z_channels}, "
          f"ch={tok_cfg.ch}, {tok_cfg.image_size} px, patch_nums={','.join(map(str, tok_cfg.patch_nums))}")
    if var is not None:
        print(f"var: {_param_count(var[1]):,} parameters, depth {var[0].depth}, width {var[0].width}")
    print(f"wrote {out}")
    return 0
