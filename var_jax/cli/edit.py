"""Zero-shot in-painting, out-painting and class-conditional editing (the reference's editing notebook).

  python -m var_jax edit --checkpoint runs/model --image photo.png --box 0.25,0.25,0.75,0.75 --mode inpaint \\
      --out edited.png
  python -m var_jax edit --checkpoint runs/model --image photo.png --mask mask.png --mode outpaint --class 207 \\
      --out edited.png

The marked region is a box (y0,x0,y1,x1 as fractions of the image side) or the white pixels of a mask PNG (same
size as the image). inpaint regenerates the marked region and keeps the rest; outpaint keeps the marked region and
regenerates everything around it. Without --class the model fills in unconditionally; with --class the regenerated
part is drawn towards that class. Images that are not the model's size are resized (shorter side) and centre-
cropped, the mask with them.
"""
from __future__ import annotations

import argparse

from var_jax.cli import CommandError
from var_jax.paths import atomic_write, user_path


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", required=True, help="model directory (tokenizer + VAR)")
    parser.add_argument("--image", required=True, help="the image to edit")
    region = parser.add_mutually_exclusive_group(required=True)
    region.add_argument("--box", help="y0,x0,y1,x1 as fractions in [0, 1] of the image height / width")
    region.add_argument("--mask", help="mask image, white = the marked region")
    parser.add_argument("--mode", choices=("inpaint", "outpaint"), default="inpaint",
                        help="inpaint: regenerate the marked region; outpaint: regenerate outside it")
    parser.add_argument("--class", dest="class_id", type=int, default=None,
                        help="class of the regenerated content (default: unconditional)")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale (the notebook uses 3)")
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax embeddings (smoother look)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output PNG")


def _load(path: str, size: int, grey: bool = False):
    import numpy as np
    from PIL import Image

    from var_jax.data.transforms import preprocess
    try:
        with user_path(path).open("rb") as f, Image.open(f) as image:
            image.load()
            original = image.size
            array = np.asarray(image.convert("RGB"), np.uint8)
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e}") from None
    if array.shape[:2] != (size, size):
        array = preprocess(array, size, train=False)
    return (array[..., 0].astype(np.float32) / 255.0 if grey else array), original


def run(args):
    from PIL import Image

    from var_jax.checkpoints import CheckpointError, load_model_dir
    from var_jax.images import image_format
    from var_jax.sample.edit import edit

    try:
        image_format(args.out)
    except ValueError as e:
        raise CommandError(f"--out {e}") from None
    from var_jax.sample.sampler import SampleOptions

    try:
        bundle = load_model_dir(args.checkpoint)
    except (CheckpointError, OSError) as e:
        raise CommandError(str(e)) from None
    if bundle.var is None:
        raise CommandError(f"{args.checkpoint} has no VAR transformer; editing needs one")
    size = bundle.tokenizer_config.image_size
    image, image_size = _load(args.image, size)
    box = mask = None
    if args.box is not None:
        try:
            box = [float(v) for v in args.box.split(",")]
        except ValueError:
            raise CommandError(f"--box must be four comma-separated numbers, got {args.box!r}") from None
        if len(box) != 4:
            raise CommandError(f"--box must be y0,x0,y1,x1, got {len(box)} numbers")
    else:
        mask, mask_size = _load(args.mask, size, grey=True)
        if mask_size != image_size:
            raise CommandError(f"--mask is {mask_size[0]}x{mask_size[1]} but --image is "
                               f"{image_size[0]}x{image_size[1]}: they must have the same size")
    try:
        options = SampleOptions(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
        result = edit(bundle, image, box=box, mask=mask, mode=args.mode, label=args.class_id, seed=args.seed,
                      options=options)
    except ValueError as e:
        raise CommandError(str(e)) from None
    out = user_path(args.out)
    atomic_write(out, lambda f: Image.fromarray(result["image"]).save(f, format=image_format(out)))
    kept = sum(int(k.sum()) for k in result["keep"])
    total = sum(k.size for k in result["keep"])
    print(f"wrote {args.out} ({args.mode}: {total - kept} of {total} tokens regenerated)")
