"""Class-conditional sampling into an OpenAI-ADM-evaluator .npz (arr_0: uint8 NHWC images, arr_1: labels) and a
PNG grid.

  python -m var_jax sample --checkpoint runs/model --classes 207,360,387,974 --num-per-class 2 --out samples/demo
  python -m var_jax sample --checkpoint runs/model --num-per-class 50 --batch-size 64 --out samples/fid50k

The defaults are the reference FID setting (cfg 1.5 with the linear ramp, top-k 900, top-p 0.96, no smoothing).
Sampling accelerators are off unless asked for (--cfg-stop-scale, --refiner/--draft-scales, --prune, --kv-window;
--help says what each trades), e.g. d30 drafting the first 8 scales and d16 refining, unguided from scale 8:

  python -m var_jax sample --checkpoint checkpoints/d30 --refiner checkpoints/d16 --draft-scales 8 \
      --cfg-stop-scale 8 --num-per-class 50 --out samples/d30_d16
Finished batches are written to OUT/shards/ as they complete; rerunning the same command after an interruption
skips them and continues. Image i always uses the random stream (seed, i), so the batch size and the number of
devices do not change the images. A rerun is tied to the model's content (run.json holds its sha256, see
var_jax.checkpoints.model_fingerprint), not to its path: a moved checkpoint resumes, a different one is refused.

Several hosts (--distributed, or --coordinator_address/--num_processes/--process_id as for `train`): each host
samples every num_processes-th batch on its own devices (--mesh then describes one host's devices) and writes
those shards; process 0 then assembles samples.npz. OUT must be a directory all hosts share (gs://, NFS). The
images are those of a single-host run with the same seed.

Bitwise models (model.head='bitwise' over a BSQ tokenizer, Infinity's) draw every bit of a token from its own
two-way softmax, with the same options applied per bit: --cfg mixes each bit's two logits as it mixes token
logits; --top-k counts a bit's two values (1 = greedy, the likelier value; 2 or more, e.g. the default 900, keeps
both); --top-p drops a bit's rarer value when its probability is at most 1 - top_p; --more-smooth gives soft codes
(Gumbel-softmax over the two values). Index heads over a BSQ tokenizer sample tokens as over a VQ one.
"""
from __future__ import annotations

import argparse
import hashlib
from var_jax.cli.common import (CommandError, accelerators_from_args, add_accelerator_arguments,
                                add_distributed_arguments, add_mesh_argument, add_run_settings_arguments,
                                check_sampling_args, parse_int_list, parse_mesh, run_settings_from_args)
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
                        help="linear: t = cfg·si/(SN−1) over the scales as the reference (raster order: over the token "
                        "index); constant: t = cfg everywhere")
    parser.add_argument("--top-k", type=int, default=900, help="keep the k largest logits (0: off, 1: greedy)")
    parser.add_argument("--top-p", type=float, default=0.96, help="nucleus filter (0: off)")
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax embeddings (visual only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="images per step, over all devices")
    parser.add_argument("--mode", choices=MODES, default=None, help="how the scales are compiled (default: the "
                        "fastest, see benchmarks/sample_bench.py); every mode gives the same images")
    add_mesh_argument(parser)
    parser.add_argument("--out", required=True, help="output directory: samples.npz, grid.png, shards/")
    add_accelerator_arguments(parser)
    add_run_settings_arguments(parser)
    add_distributed_arguments(parser)


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
    memory."""
    import numpy as np

    from var_jax.images import write_npz_streaming

    def shard_images():
        for shard in shard_paths:
            with shard.open("rb") as g, np.load(g) as data:
                yield data["images"]
    write_npz_streaming(path, [("arr_0", np.uint8, (num_images, *image_shape), shard_images()),
                               ("arr_1", np.int64, (len(labels),), [np.asarray(labels, np.int64)])])


def host_batches(num_images: int, batch_size: int, process_index: int = 0, process_count: int = 1):
    """[(batch index, start, end), ...] of the batches this host samples: batch i belongs to host i % count.
    The batch boundaries do not depend on the number of hosts, so neither do the shard files."""
    starts = range(0, num_images, batch_size)
    return [(i, a, min(a + batch_size, num_images)) for i, a in enumerate(starts) if i % process_count == process_index]


def shard_path(out, start: int, end: int):
    return out / SHARDS_DIR / f"images_{start:07d}_{end:07d}.npz"


def assemble(out, num_images: int, batch_size: int, labels):
    """samples.npz and grid.png from every batch's shard (process 0, once all hosts have written theirs)."""
    import numpy as np

    from var_jax.images import save_grid
    shard_paths = [shard_path(out, a, b) for _, a, b in host_batches(num_images, batch_size)]
    missing = [p.name for p in shard_paths if not p.exists()]
    if missing:
        raise CommandError(f"{out / SHARDS_DIR}: {len(missing)} shard(s) missing after sampling, e.g. {missing[0]} "
                           f"(is --out on storage every host shares?)")
    with shard_paths[0].open("rb") as f, np.load(f) as first:
        image_shape = first["images"].shape[1:]
    write_adm_npz(out / "samples.npz", shard_paths, num_images, image_shape, labels)
    grid = []
    for path in shard_paths:
        with path.open("rb") as f, np.load(f) as data:
            grid.append(data["images"][:GRID_IMAGES - sum(len(g) for g in grid)])
        if sum(len(g) for g in grid) >= GRID_IMAGES:
            break
    save_grid(out / "grid.png", np.concatenate(grid), columns=8)


def run(args):
    import numpy as np
    from tqdm import tqdm

    from var_jax.checkpoints import CheckpointError, load_model_dir, model_fingerprint, read_model_config
    from var_jax.cli.train import maybe_initialize_distributed

    # every check that needs no model first: loading and compiling take minutes on a large one
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_sampling_args(args)
    out = user_path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is an existing file; --out names a directory (samples.npz, grid.png, "
                           f"shards/ go inside it)")
    try:
        config = read_model_config(args.checkpoint)
    except (CheckpointError, OSError) as e:
        raise CommandError(str(e)) from None
    if not config.get("var") or not config.get("tokenizer"):
        raise CommandError(f"{args.checkpoint} needs both a tokenizer and a VAR transformer to sample")
    num_classes = int(config["var"].get("num_classes", 1000))
    labels = plan_labels(args.classes, args.num_per_class, num_classes)
    accel = accelerators_from_args(args, config)
    maybe_initialize_distributed(args)

    import jax

    from var_jax.checkpoints import sync_hosts
    from var_jax.sample.runner import Sampler
    from var_jax.sample.sampler import DEFAULT_MODE, SampleOptions
    from var_jax.sharding import make_mesh

    try:
        options = SampleOptions(cfg=args.cfg, cfg_schedule=args.cfg_schedule, top_k=args.top_k, top_p=args.top_p,
                                more_smooth=args.more_smooth, mode=args.mode or DEFAULT_MODE, accel=accel).validate()
        # hosts sample different batches independently: each one's mesh is its own devices
        mesh = make_mesh(parse_mesh(args.mesh), devices=jax.local_devices())
    except ValueError as e:
        raise CommandError(str(e)) from None

    # everything that decides the images and the shard boundaries (the mode does not change the images)
    try:
        fingerprint = model_fingerprint(args.checkpoint)
    except (CheckpointError, OSError) as e:
        raise CommandError(str(e)) from None
    run_settings = run_settings_from_args(args)
    # the compute dtype changes the images (bfloat16 vs float32 logits), so a resumed run must keep it
    run_config = {"model_sha256": fingerprint, "compute_dtype": run_settings.compute_dtype, "seed": args.seed,
                  "batch_size": args.batch_size, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
                  "top_k": args.top_k, "top_p": args.top_p, "more_smooth": args.more_smooth,
                  "labels_sha1": hashlib.sha1(labels.tobytes()).hexdigest(), "num_images": int(len(labels))}
    if accel.active:   # recorded only when on: a plain run's run.json is what it always was
        run_config["accelerators"] = accel.describe()
    if args.refiner is not None:
        try:
            run_config["refiner_sha256"] = model_fingerprint(args.refiner)
        except (CheckpointError, OSError) as e:
            raise CommandError(f"--refiner {args.refiner}: {e}") from None
    writer = jax.process_index() == 0
    # only process 0 records run.json; the others refuse a different run already there just as it does
    check_same_settings(out, RUN_FILE, run_config, "an unfinished run", "--out", record=writer)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    mine = host_batches(len(labels), args.batch_size, jax.process_index(), jax.process_count())
    todo = [(a, b) for _, a, b in mine if not shard_path(out, a, b).exists()]

    if todo:
        try:
            bundle = load_model_dir(args.checkpoint, mesh=mesh, run_settings=run_settings)
            refiner = None if args.refiner is None else load_model_dir(args.refiner, mesh=mesh,
                                                                          run_settings=run_settings)
        except (CheckpointError, OSError) as e:
            raise CommandError(str(e)) from None
        try:
            sampler = Sampler(bundle, options, mesh, refiner=refiner)
        except ValueError as e:
            raise CommandError(f"--refiner {args.refiner}: {e}") from None
        del bundle, refiner   # the sampler holds what it needs; this frees the tokenizers' encoder weights
        total = sum(b - a for _, a, b in mine)
        with tqdm(total=total, initial=total - sum(b - a for a, b in todo), unit="img", desc="sampling",
                  disable=not writer) as progress:
            for a, b in todo:
                images = sampler(labels[a:b], image_ids=np.arange(a, b), seed=args.seed, pad_to=args.batch_size)["images"]
                atomic_write(shard_path(out, a, b), lambda f: np.savez(f, images=images, labels=labels[a:b]))
                progress.update(b - a)
    sync_hosts("var_jax.sample.shards_written")
    if writer:
        assemble(out, len(labels), args.batch_size, labels)
        print(f"wrote {len(labels)} images to {out / 'samples.npz'} and {out / 'grid.png'}")
    return 0
