"""Tokenize and decode images with a tokenizer checkpoint; writes the reconstructions and tokens, prints PSNR.

Examples:
  python -m var_jax reconstruct --checkpoint checkpoints/vae256 --images val_images/ --out rec.npz
  python -m var_jax reconstruct --checkpoint checkpoints/vae256 --images images.npz --out rec.npz --batch-size 32

--images is an .npz whose `arr_0` is uint8 (N, H, W, 3) at the tokenizer's image size, or a folder of image files
(resized on the shorter side and center-cropped, the reference's evaluation transform). The output .npz holds
`arr_0` uint8 (N, H, W, 3) reconstructions and `tokens_<k>` int32 (N, pn_k²) per scale k.
"""
from __future__ import annotations

import functools

from var_jax.cli import CommandError, parse_int_list
from var_jax.paths import atomic_write, user_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="var-jax model directory holding a tokenizer")
    parser.add_argument("--images", required=True, help="input .npz (arr_0 uint8 NHWC) or a folder of images")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    parser.add_argument("--mesh", default="-1,1,1",
                        help="device mesh sizes data,fsdp,tensor; -1 = all remaining devices (default -1,1,1)")


def load_images(source: str, image_size: int):
    """uint8 (N, image_size, image_size, 3) from an .npz (arr_0) or a folder of image files."""
    import numpy as np

    path = user_path(source)
    if path.is_dir():
        from var_jax.data.transforms import load_image_for_eval
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CommandError(f"--images {path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return np.stack([load_image_for_eval(p, image_size) for p in files])
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise CommandError(f"--images {path}: expected an existing .npz file or a folder of images")
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise CommandError(f"--images {path}: no 'arr_0' entry (has {data.files})")
            images = data["arr_0"]
    except CommandError:
        raise
    except Exception as e:  # a damaged archive
        raise CommandError(f"--images {path}: cannot read: {e}") from None
    expected = (image_size, image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise CommandError(f"--images {path}: arr_0 must be uint8 (N, {image_size}, {image_size}, 3) for this "
                           f"tokenizer, got {images.dtype} {images.shape}")
    return images


@functools.cache
def compiled_reconstruct_batch():
    """`reconstruct_batch` under jit, built once per process so repeated runs reuse its compilations."""
    import jax
    return jax.jit(reconstruct_batch, static_argnums=0)


def reconstruct_batch(graphdef, state, images):
    """images in [-1, 1] -> (reconstructions in [-1, 1], per-scale tokens); pure, jit with graphdef static."""
    from flax import nnx

    from var_jax.tokenizer.quantizer import f_to_tokens

    model = nnx.merge(graphdef, state)
    tokens, f_hats = f_to_tokens(model.quantizer_params(), model.encode(images), model.cfg)
    return model.decode(f_hats[-1]), tokens


def run(args):
    import jax
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from var_jax.checkpoints import CheckpointError, load_model_dir
    from var_jax.data.transforms import from_model_range, to_model_range
    from var_jax.eval.metrics import psnr
    from var_jax.sharding import batch_sharding, data_parallel_size, make_mesh

    try:
        mesh = make_mesh(parse_int_list(args.mesh, "--mesh"))
    except ValueError as e:
        raise CommandError(f"--mesh: {e}") from None
    dp = data_parallel_size(mesh)
    if args.batch_size < 1 or args.batch_size % dp:
        raise CommandError(f"--batch-size {args.batch_size} must be a positive multiple of the {dp} data-parallel "
                           f"devices of mesh {dict(mesh.shape)}")
    try:
        bundle = load_model_dir(args.checkpoint, mesh=mesh)
    except CheckpointError as e:
        raise CommandError(str(e)) from None
    if bundle.tokenizer is None:
        raise CommandError(f"{args.checkpoint} holds no tokenizer")
    cfg = bundle.tokenizer_config
    images = load_images(args.images, cfg.image_size)
    n, bs = len(images), args.batch_size

    graphdef, state = nnx.split(bundle.tokenizer)
    step = compiled_reconstruct_batch()
    in_sharding = batch_sharding(mesh, 4)
    recs, tokens = [], [[] for _ in cfg.patch_nums]
    for start in tqdm(range(0, n, bs), desc="reconstruct", unit="batch"):
        batch = images[start:start + bs]
        real = len(batch)
        if real < bs:   # pad the last batch (repeating its last image) so every batch compiles to one shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, axis=0)])
        rec, toks = step(graphdef, state, jax.device_put(to_model_range(batch), in_sharding))
        recs.append(from_model_range(np.asarray(rec)[:real]))
        for k, t in enumerate(toks):
            tokens[k].append(np.asarray(t)[:real].astype(np.int32))

    out = {"arr_0": np.concatenate(recs)}
    out.update({f"tokens_{k}": np.concatenate(t) for k, t in enumerate(tokens)})
    out_path = user_path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda f: np.savez(f, **out))
    print(f"PSNR {psnr(out['arr_0'], images):.2f} dB over {n} images ({cfg.image_size} px); wrote {out_path}")
    return 0
