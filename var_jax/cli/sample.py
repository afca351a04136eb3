"""Class-conditional sampling into an OpenAI-ADM-evaluator .npz (arr_0: uint8 NHWC images, arr_1: labels) and a
PNG grid.

  python -m var_jax sample --checkpoint runs/model --classes 207,360,387,974 --num-per-class 2 --out samples/demo
  python -m var_jax sample --checkpoint runs/model --num-per-class 50 --batch-size 64 --out samples/fid50k

The defaults are the reference FID setting (cfg 1.5 with the linear ramp, top-k 900, top-p 0.96, no smoothing).
Finished batches are written to OUT/shards/ as they complete; rerunning the same command after an interruption
skips them and continues. Image i always uses the random stream (seed, i), so the batch size and the number of
devices do not change the images.
"""
from __future__ import annotations

import argparse
import hashlib
import zipfile
from var_jax.cli import CommandError, parse_int_list
from var_jax.cli.reruns import check_same_settings
from var_jax.paths import atomic_write, user_path

MODES = ("unrolled", "grouped", "scanned")   # var_jax.sample.schedule.MODES, without importing jax for --help
SHARDS_DIR = "shards"
RUN_FILE = "run.json"
GRID_IMAGES = 64


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", required=True, help="model directory (var-jax convert / train output)")
    parser.add_argument("--classes", help="comma-separated class ids (default: every class of the model)")
    parser.add_argument("--num-per-class", type=int, default=1, help="images per class (default 1; FID: 50)")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (0: off)")
    parser.add_argument("--cfg-schedule", choices=("linear", "constant"), default="linear",
                        help="linear: t = cfg·si/(SN−1) as the reference; constant: t = cfg at every scale")
    parser.add_argument("--top-k", type=int, default=900, help="keep the k largest logits (0: off, 1: greedy)")
    parser.add_argument("--top-p", type=float, default=0.96, help="nucleus filter (0: off)")
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax embeddings (visual only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="images per step, over all devices")
    parser.add_argument("--mode", choices=MODES, default=None, help="how the scales are compiled (default: the "
                        "fastest, see benchmarks/sample_bench.py); every mode gives the same images")
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor mesh sizes (one may be -1)")
    parser.add_argument("--out", required=True, help="output directory: samples.npz, grid.png, shards/")


def plan_labels(classes: str | None, num_per_class: int, num_classes: int):
    """Labels of every image, class by class; class ids are checked against the model."""
    import numpy as np
    if num_per_class < 1:
        raise CommandError(f"--num-per-class must be >= 1, got {num_per_class}")
    ids = list(range(num_classes)) if classes is None else parse_int_list(classes, "--classes")
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad:
        raise CommandError(f"--classes: class ids {bad[:10]} out of range; this model has classes "
                           f"0..{num_classes - 1}")
    return np.repeat(np.asarray(ids, np.int64), num_per_class)


def write_adm_npz(path, shard_paths, num_images: int, image_shape, labels):
    """Stream the shards into one .npz (arr_0 uint8 NHWC, arr_1 int64 labels) without holding every image in
    memory: the zip entry is a .npy header followed by each shard's bytes."""
    import numpy as np

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_2_0(
                    entry, {"descr": np.dtype(np.uint8).str, "fortran_order": False,
                            "shape": (num_images, *image_shape)})
                for shard in shard_paths:
                    with shard.open("rb") as g, np.load(g) as data:
                        entry.write(np.ascontiguousarray(data["images"]).tobytes())
            with zf.open("arr_1.npy", "w") as entry:
                np.lib.format.write_array(entry, np.asarray(labels, np.int64))
    atomic_write(path, write)


def run(args):
    import numpy as np
    from tqdm import tqdm

    from var_jax.checkpoints import CheckpointError, load_model_dir, read_model_config

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        config = read_model_config(args.checkpoint)
    except (CheckpointError, OSError) as e:
        raise CommandError(str(e)) from None
    if not config.get("var") or not config.get("tokenizer"):
        raise CommandError(f"{args.checkpoint} needs both a tokenizer and a VAR transformer to sample")
    num_classes = int(config["var"].get("num_classes", 1000))
    labels = plan_labels(args.classes, args.num_per_class, num_classes)

    import jax

    from var_jax.images import save_grid
    from var_jax.sample.runner import Sampler
    from var_jax.sample.sampler import DEFAULT_MODE, SampleOptions
    from var_jax.sharding import make_mesh

    try:
        options = SampleOptions(cfg=args.cfg, cfg_schedule=args.cfg_schedule, top_k=args.top_k, top_p=args.top_p,
                                more_smooth=args.more_smooth, mode=args.mode or DEFAULT_MODE).validate()
        mesh = make_mesh(parse_int_list(args.mesh, "--mesh"))
    except ValueError as e:
        raise CommandError(str(e)) from None

    out = user_path(args.out)
    # everything that decides the images and the shard boundaries (the mode does not change the images)
    run_config = {"checkpoint": str(user_path(args.checkpoint)), "seed": args.seed,
                  "batch_size": args.batch_size, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
                  "top_k": args.top_k, "top_p": args.top_p, "more_smooth": args.more_smooth,
                  "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest(), "num_images": int(len(labels))}
    writer = jax.process_index() == 0
    if writer:
        check_same_settings(out, RUN_FILE, run_config, "an unfinished run", "--out")
        (out / SHARDS_DIR).mkdir(exist_ok=True)
    batches = [(start, min(start + args.batch_size, len(labels))) for start in range(0, len(labels), args.batch_size)]
    shard_paths = [out / SHARDS_DIR / f"images_{a:07d}_{b:07d}.npz" for a, b in batches]
    todo = [i for i, path in enumerate(shard_paths) if not path.exists()]

    if todo:
        try:
            bundle = load_model_dir(args.checkpoint, mesh=mesh)
        except (CheckpointError, OSError) as e:
            raise CommandError(str(e)) from None
        sampler = Sampler(bundle, options, mesh)
        with tqdm(total=len(labels), initial=len(labels) - sum(b - a for a, b in (batches[i] for i in todo)),
                  unit="img", desc="sampling") as progress:
            for i in todo:
                a, b = batches[i]
                images = sampler(labels[a:b], image_ids=np.arange(a, b), seed=args.seed, pad_to=args.batch_size)["images"]
                if writer:
                    atomic_write(shard_paths[i], lambda f: np.savez(f, images=images, labels=labels[a:b]))
                progress.update(b - a)

    if writer:
        with shard_paths[0].open("rb") as f, np.load(f) as first:
            image_shape = first["images"].shape[1:]
        write_adm_npz(out / "samples.npz", shard_paths, len(labels), image_shape, labels)
        grid = []
        for path in shard_paths:
            with path.open("rb") as f, np.load(f) as data:
                grid.append(data["images"][:GRID_IMAGES - sum(len(g) for g in grid)])
            if sum(len(g) for g in grid) >= GRID_IMAGES:
                break
        save_grid(out / "grid.png", np.concatenate(grid), columns=8)
        print(f"wrote {len(labels)} images to {out / 'samples.npz'} and {out / 'grid.png'}")
    return 0
