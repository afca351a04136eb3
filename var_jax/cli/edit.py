"""Zero-shot in-painting, out-painting and class-conditional editing (the reference's editing notebook).

  python -m var_jax edit --checkpoint runs/model --image photo.png --box 0.25,0.25,0.75,0.75 --mode inpaint \\
      --out edited.png
  python -m var_jax edit --checkpoint runs/model --image photo.png --mask mask.png --mode outpaint --class 207 \\
      --out edited.png

The marked region is a box (y0,x0,y1,x1 as fractions of the image side) or the white pixels of a mask PNG (same
size as the image). inpaint regenerates the marked region and keeps the rest; outpaint keeps the marked region and
regenerates everything around it. Without --class the model fills in unconditionally; with --class the regenerated
part is drawn towards that class. Images that are not the model's size are resized (shorter side) and centre-
cropped, the mask with them. The sampling accelerators of `sample` (--cfg-stop-scale, --refiner/--draft-scales,
--prune, --kv-window; off by default) apply here too.
"""
from __future__ import annotations

import argparse

from var_jax.cli.common import (CommandError, accelerators_from_args, add_accelerator_arguments,
                                add_run_settings_arguments, run_settings_from_args)
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
    add_run_settings_arguments(parser)
    add_accelerator_arguments(parser)


def _read(path: str, what: str):
    """uint8 (H, W, 3) of an image file, decoded in full (so a damaged file fails here, before the model loads)."""
    import numpy as np
    from PIL import Image
    try:
        with user_path(path).open("rb") as f, Image.open(f) as image:
            image.load()
            return np.asarray(image.convert("RGB"), np.uint8)
    except OSError as e:
        raise CommandError(f"{what} {path}: cannot read: {e}") from None


def _fit(array, size: int):
    """Resize (shorter side) and centre-crop to the model's size, as the reference's evaluation transform."""
    from var_jax.data.transforms import preprocess
    return array if array.shape[:2] == (size, size) else preprocess(array, size, train=False)


def _parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        raise CommandError(f"--box must be four comma-separated numbers, got {text!r}") from None
    if len(box) != 4:
        raise CommandError(f"--box must be y0,x0,y1,x1, got {len(box)} numbers")
    return box


def run(args):
    import numpy as np
    from PIL import Image

    from var_jax.checkpoints import CheckpointError, load_model_dir, read_model_config
    from var_jax.cli.common import check_sampling_args
    from var_jax.images import image_format

    # every check that needs no model first: loading and compiling take minutes on a large one
    check_sampling_args(args)
    out = user_path(args.out)
    try:
        fmt = image_format(out)
    except ValueError as e:
        raise CommandError(f"--out {e}") from None
    if out.is_dir():
        raise CommandError(f"--out {out} is a directory; give an image file name such as edited.png")
    try:
        model_config = read_model_config(args.checkpoint)
    except (CheckpointError, OSError) as e:
        raise CommandError(str(e)) from None
    var_config = model_config.get("var")
    if not var_config or not model_config.get("tokenizer"):
        raise CommandError(f"{args.checkpoint} needs both a tokenizer and a VAR transformer to edit")
    accel = accelerators_from_args(args, model_config)
    num_classes = int(var_config.get("num_classes", 1000))
    if args.class_id is not None and not 0 <= args.class_id < num_classes:
        raise CommandError(f"--class {args.class_id} out of range: this model has classes 0..{num_classes - 1} "
                           f"(leave --class out for unconditional)")
    image = _read(args.image, "--image")
    box = mask = None
    if args.box is not None:
        box = _parse_box(args.box)
    else:
        mask = _read(args.mask, "--mask")
        if mask.shape[:2] != image.shape[:2]:
            raise CommandError(f"--mask is {mask.shape[1]}x{mask.shape[0]} but --image is "
                               f"{image.shape[1]}x{image.shape[0]}: they must have the same size")

    from var_jax.sample.edit import edit
    from var_jax.sample.sampler import SampleOptions
    try:
        run_settings = run_settings_from_args(args)
        bundle = load_model_dir(args.checkpoint, run_settings=run_settings)
        refiner = None if args.refiner is None else load_model_dir(args.refiner, run_settings=run_settings)
    except (CheckpointError, OSError) as e:
        raise CommandError(str(e)) from None
    size = bundle.tokenizer_config.image_size
    if mask is not None:
        mask = _fit(mask, size)[..., 0].astype(np.float32) / 255.0
    try:
        options = SampleOptions(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                                accel=accel)
        result = edit(bundle, _fit(image, size), box=box, mask=mask, mode=args.mode, label=args.class_id,
                      seed=args.seed, options=options, refiner=refiner)
    except ValueError as e:
        raise CommandError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: Image.fromarray(result["image"]).save(f, format=fmt))
    kept = sum(int(k.sum()) for k in result["keep"])
    total = sum(k.size for k in result["keep"])
    print(f"wrote {args.out} ({args.mode}: {total - kept} of {total} tokens regenerated)")
