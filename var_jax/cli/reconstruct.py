"""Tokenize and decode images with a tokenizer checkpoint; writes the reconstructions and tokens, prints PSNR.

Examples:
  python -m var_jax reconstruct --checkpoint checkpoints/vae256 --images val_images/ --out rec.npz
  python -m var_jax reconstruct --checkpoint checkpoints/vae256 --images images.npz --out rec.npz --batch-size 32

--images is an .npz whose `arr_0` is uint8 (N, H, W, 3) at the tokenizer's image size, or a folder of image files
(resized on the shorter side and center-cropped, the reference's evaluation transform); files that cannot be
decoded are skipped and listed. The output .npz holds `arr_0` uint8 (N, H, W, 3) reconstructions and `tokens_<k>`
int32 (N, pn_k²) per scale k.

Inputs and outputs are streamed a batch at a time (the input .npz row by row from its zip entry, the folder file by
file; the outputs through temporary files beside --out that vanish with the process), so memory holds one batch
whatever the number of images; the disk briefly holds the output twice.
"""
from __future__ import annotations

import functools
import sys
import tempfile

from var_jax.cli.common import CommandError, add_mesh_argument, batch_mesh
from var_jax.eval.sources import IMAGE_SUFFIXES   # the eval command reads the same kinds of file
from var_jax.paths import user_path


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="var-jax model directory holding a tokenizer")
    parser.add_argument("--images", required=True, help="input .npz (arr_0 uint8 NHWC) or a folder of images")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
    add_mesh_argument(parser)


class FolderImages:
    """The image files of a folder, decoded a batch at a time; files that cannot be decoded are skipped and
    kept in `skipped` (as training does with its data)."""

    def __init__(self, path, image_size: int):
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise CommandError(f"--images {path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.path, self.image_size = path, image_size
        self.skipped: list[str] = []

    def __len__(self):
        return len(self.files)

    def batches(self, batch_size: int):
        import numpy as np

        from var_jax.data.transforms import load_image_for_eval
        batch = []
        for file in self.files:
            try:
                batch.append(load_image_for_eval(file, self.image_size))
            except (OSError, ValueError) as e:   # PIL: unidentified or truncated file
                self.skipped.append(file.name)
                print(f"reconstruct: skipping unreadable {file}: {e}", file=sys.stderr)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def open_images(source: str, image_size: int):
    """The images of --images, read a batch at a time: an .npz's arr_0 streamed from the archive (the eval
    command's reader), or FolderImages; errors name the option and the problem."""
    from var_jax.eval.sources import NpzImages, SourceError
    path = user_path(source)
    if path.is_dir():
        return FolderImages(path, image_size)
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise CommandError(f"--images {path}: expected an existing .npz file or a folder of images")
    try:
        images = NpzImages(path)
    except SourceError as e:
        raise CommandError(f"--images {e}") from None
    if images.image_shape != (image_size, image_size, 3):
        raise CommandError(f"--images {path}: arr_0 must be uint8 (N, {image_size}, {image_size}, 3) for this "
                           f"tokenizer, got {(len(images), *images.image_shape)}")
    images.skipped = []   # an array has no unreadable files
    return images


class RowSpool:
    """Output arrays grown a batch of rows at a time in unnamed temporary files (gone when the process ends,
    however it ends), then streamed into one .npz: memory holds one batch."""

    def __init__(self, directory=None):
        self.directory = directory
        self.files, self.rows = {}, {}

    def append(self, name: str, rows):
        import numpy as np
        rows = np.ascontiguousarray(rows)
        if name not in self.files:
            self.files[name] = tempfile.TemporaryFile(dir=self.directory)
            self.rows[name] = (rows.dtype, rows.shape[1:], 0)
        dtype, shape, n = self.rows[name]
        self.files[name].write(rows.tobytes())
        self.rows[name] = (dtype, shape, n + len(rows))

    def write_npz(self, path):
        from var_jax.images import write_npz_streaming

        def chunks(f):
            f.seek(0)
            while chunk := f.read(1 << 24):
                yield chunk
        write_npz_streaming(path, [(name, dtype, (n, *shape), chunks(self.files[name]))
                                   for name, (dtype, shape, n) in self.rows.items()])

    def close(self):
        for f in self.files.values():
            f.close()


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
    tokens, f_hats = f_to_tokens(model.quantizer_params(), model.encode(images, per_sample=True), model.cfg)
    return model.decode(f_hats[-1]), tokens


def run(args):
    out_path = user_path(args.out)
    if out_path.suffix.lower() != ".npz":
        raise CommandError(f"--out {out_path} must end in .npz (the reconstructions and tokens are one .npz)")
    if out_path.is_dir():
        raise CommandError(f"--out {out_path} is a directory; give a file name ending in .npz")

    import jax
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from var_jax.checkpoints import CheckpointError, load_model_dir, read_model_config
    from var_jax.data.transforms import from_model_range, to_model_range
    from var_jax.eval.metrics import psnr_per_image
    from var_jax.paths import is_local
    from var_jax.sharding import batch_sharding
    from var_jax.tokenizer.config import TokenizerConfig

    mesh = batch_mesh(args.mesh, args.batch_size)
    # the inputs are checked against the config before the model is loaded and compiled
    try:
        config = read_model_config(args.checkpoint)
        if config.get("tokenizer") is None:
            raise CommandError(f"{args.checkpoint} holds no tokenizer")
        image_size = TokenizerConfig.from_dict(config["tokenizer"]).image_size
    except (CheckpointError, OSError, TypeError, ValueError) as e:
        raise CommandError(str(e)) from None
    images = open_images(args.images, image_size)
    try:
        bundle = load_model_dir(args.checkpoint, mesh=mesh)
    except (CheckpointError, OSError) as e:
        raise CommandError(str(e)) from None
    cfg, bs = bundle.tokenizer_config, args.batch_size

    graphdef, state = nnx.split(bundle.tokenizer)
    step = compiled_reconstruct_batch()
    in_sharding = batch_sharding(mesh, 4)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spool = RowSpool(out_path.parent if is_local(out_path) else None)
    psnrs = []
    try:
        for batch in tqdm(images.batches(bs), total=-(-len(images) // bs), desc="reconstruct", unit="batch"):
            real = len(batch)
            if real < bs:   # pad the last batch (repeating its last image) so every batch compiles to one shape
                batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, axis=0)])
            rec, toks = step(graphdef, state, jax.device_put(to_model_range(batch), in_sharding))
            rec = from_model_range(np.asarray(rec)[:real])
            psnrs.append(psnr_per_image(rec, batch[:real]))
            spool.append("arr_0", rec)
            for k, t in enumerate(toks):
                spool.append(f"tokens_{k}", np.asarray(t)[:real].astype(np.int32))
        if not psnrs:
            raise CommandError(f"--images {args.images}: none of the {len(images)} image files could be read")
        spool.write_npz(out_path)
    finally:
        spool.close()
    n = sum(len(p) for p in psnrs)
    skipped = (f"; skipped {len(images.skipped)} unreadable file(s): {', '.join(images.skipped[:5])}"
               f"{' ...' if len(images.skipped) > 5 else ''}" if images.skipped else "")
    print(f"PSNR {float(np.mean(np.concatenate(psnrs))):.2f} dB over {n} images ({cfg.image_size} px); "
          f"wrote {out_path}{skipped}")
    return 0
