"""Encode a split of images once into a token set (var_jax/data/tokens.py) that `train` reads with
--config.data.name=tokens: the VAR stage then never runs the tokenizer's encoder.

    python -m var_jax tokenize --checkpoint workdirs/shapes_tokenizer --config configs/shapes_var.py:latent=8 \\
        --out tokens/shapes8_train --count 100000
    python -m var_jax tokenize --checkpoint workdirs/shapes_tokenizer --config configs/shapes_var.py:latent=8 \\
        --out tokens/shapes8_val --split val --count 2000
    python -m var_jax train --config configs/shapes_var.py:latent=8 --workdir workdirs/shapes_var_tokens \\
        --config.tokenizer_checkpoint=workdirs/shapes_tokenizer --config.data.name=tokens \\
        --config.data.dir=tokens/shapes8_train --config.data.eval_dir=tokens/shapes8_val

--config FILE[:ARG] and --config.KEY=VALUE are read as `train` reads them: the config's `data` section names the
images, its patch_nums and data.image_size decide the tokens, and --checkpoint is loaded as train loads
tokenizer_checkpoint (a model directory, or a tokenizer training workdir whose model/ is exported).

--split (default: the config's training split) is encoded once. The held-out split (data.eval_split, else the
source's) takes the evaluation transform (centre crop); any other split the training transform, image i's random
crop drawn from a generator seeded by (config seed, i). --count N: the split's first N images (required for the
endless shapes training split). --flip also stores every image's mirrored tokens; training then draws one of the
two per example and epoch.

Finished shards are written whole (a temporary file renamed, one upload on gs://), so rerunning the same command
after an interruption continues at the first missing shard; a rerun with other settings is refused (meta.json).
Several hosts (--distributed, or --coordinator_address/--num_processes/--process_id as for `train`): host p of P
encodes shards p, p + P, ... on its own devices; OUT must be storage every host shares (gs://, NFS).
"""
from __future__ import annotations

import argparse

from var_jax.cli.common import CommandError, add_distributed_arguments
from var_jax.cli.train import apply_overrides, config_overrides, load_config, maybe_initialize_distributed

DEFAULT_SHARD_SIZE = 4096     # examples per shard: 0.5-5 MB of tokens, a few seconds of encoding to redo at most


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", required=True,
                        help="tokenizer model directory, or a tokenizer training workdir (its model/)")
    parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                        help="the VAR training config whose data and patch_nums to use, e.g. configs/shapes_var.py")
    parser.add_argument("--out", required=True, help="output directory: meta.json and shard-*.npz")
    parser.add_argument("--split", default=None, help="split to encode (default: the config's training split)")
    parser.add_argument("--count", type=int, default=None, help="encode the split's first N images (default: all)")
    parser.add_argument("--flip", action="store_true", help="also store each image's horizontally flipped tokens")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call on this host")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="examples per shard file")
    add_distributed_arguments(parser)


def take_extra_arguments(args, extra):
    """The `--config.KEY=VALUE` overrides, read as `train` reads them."""
    args.config_overrides = config_overrides(extra)


def plan_split(data: dict, split: str | None) -> tuple[str, bool]:
    """(split to encode, whether it takes the training transform) of a data config."""
    from var_jax.data.sources import HELD_OUT_SPLITS, TRAIN_SPLITS
    name = data.get("name")
    if name == "tokens":
        raise CommandError("--config: data.name is 'tokens'; tokenize reads images (set --config.data.name to the "
                           "image source the tokens come from)")
    if name not in TRAIN_SPLITS:
        raise CommandError(f"--config: data.name must be one of {tuple(TRAIN_SPLITS)}, got {name!r}")
    split = split or data.get("split") or TRAIN_SPLITS[name]
    return split, split != (data.get("eval_split") or HELD_OUT_SPLITS[name])


def build_meta(*, tokenizer: dict, data: dict, split: str, train: bool, count: int, seed: int, flip: bool,
               num_classes: int, seq_len: int, vocab_size: int, shard_size: int) -> dict:
    """meta.json (see data/tokens.py), in its JSON form so that a rerun compares equal."""
    import json

    from var_jax.data.sources import SOURCE_KEYS
    from var_jax.data import tokens
    meta = {"format": tokens.FORMAT_NAME, "version": tokens.FORMAT_VERSION, "tokenizer": tokenizer,
            "image_size": int(data["image_size"]), "count": count, "split": split,
            "transform": "train" if train else "eval", "seed": seed if train else None, "flip": flip,
            "source": {**{k: v for k, v in data.items() if k in SOURCE_KEYS}, "split": split},
            "num_classes": num_classes, "seq_len": seq_len, "token_dtype": tokens.token_dtype(vocab_size).name,
            "shard_size": shard_size, "num_shards": len(tokens.shard_ranges(count, shard_size))}
    return json.loads(json.dumps(meta))


def run(args):
    for option, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size),
                          ("--count", 1 if args.count is None else args.count)):
        if value < 1:
            raise CommandError(f"{option} must be >= 1, got {value}")
    config = apply_overrides(load_config(args.config), getattr(args, "config_overrides", []))
    data = {k: v for k, v in config.data.to_dict().items() if v not in ("", None)}
    split, train = plan_split(data, args.split)
    if train and data.get("hflip") and not args.flip:
        raise CommandError("--config: data.hflip is set; pass --flip to store the mirrored tokens training draws")
    maybe_initialize_distributed(args)

    import jax

    from var_jax.data.shapes import DEFAULT_TRAIN_SIZE
    from var_jax.data.sources import build_source
    from var_jax.sharding import make_mesh
    from var_jax.train.stage import ConfigError, load_tokenizer_for

    try:
        source, num_classes = build_source({**data, "split": split})
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        raise CommandError(f"--config data: {e}") from None
    if args.count is None and len(source) >= DEFAULT_TRAIN_SIZE:
        raise CommandError(f"--count is required: the {data['name']} {split!r} split is endless")
    count = len(source) if args.count is None else args.count
    if count > len(source):
        raise CommandError(f"--count {count}: the {data['name']} {split!r} split has {len(source)} images")
    # each host encodes its own shards on its own devices
    mesh = make_mesh((-1, 1, 1), devices=jax.local_devices())
    if args.batch_size % jax.local_device_count():
        raise CommandError(f"--batch-size {args.batch_size} must be a multiple of this host's "
                           f"{jax.local_device_count()} devices")
    config.tokenizer_checkpoint = args.checkpoint
    try:
        tok_cfg, tokenizer = load_tokenizer_for(config, mesh)
    except ConfigError as e:
        raise CommandError(str(e).replace("tokenizer_checkpoint:", "--checkpoint:", 1)) from None

    from var_jax.cli.reruns import check_same_settings
    from var_jax.data.tokens import tokenizer_identity
    from var_jax.paths import user_path
    out = user_path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is an existing file; --out names a directory")
    meta = build_meta(tokenizer=tokenizer_identity(tok_cfg, tokenizer), data=data, split=split, train=train,
                      count=count, seed=int(config.seed), flip=args.flip, num_classes=num_classes,
                      seq_len=sum(pn * pn for pn in tok_cfg.patch_nums), vocab_size=tok_cfg.vocab_size,
                      shard_size=args.shard_size)
    check_same_settings(out, "meta.json", meta, "a token set", "--out", record=jax.process_index() == 0)
    encode_shards(out, source, meta, tok_cfg, tokenizer, mesh, batch_size=args.batch_size,
                  process_index=jax.process_index(), process_count=jax.process_count())
    return 0


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The shards host p of P writes: p, p + P, ... (shard boundaries do not depend on the number of hosts)."""
    return list(range(process_index, num_shards, process_count))


def encode_shards(out, source, meta: dict, tok_cfg, tokenizer, mesh, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1):
    """Encode this host's missing shards, one batch at a time (memory: one shard of tokens and a few batches
    of images), then check that every host's shards are there."""
    import grain
    import jax
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from var_jax.checkpoints import sync_hosts
    from var_jax.data import tokens
    from var_jax.paths import is_local
    from var_jax.sharding import batch_sharding
    from var_jax.train.var.step import make_tokenizer_fn

    count, num_shards, shard_size = int(meta["count"]), int(meta["num_shards"]), int(meta["shard_size"])
    ranges = tokens.shard_ranges(count, shard_size)
    mine = host_shards(num_shards, process_index, process_count)
    todo = [k for k in mine if not (out / tokens.shard_name(k, num_shards)).exists()]
    out.mkdir(parents=True, exist_ok=True)   # process 0 may not have recorded meta.json yet
    if is_local(out):   # temporary files a killed run left behind (a bucket never holds partial objects)
        for k in todo:
            for stale in out.glob(f".{tokens.shard_name(k, num_shards)}.tmp-*"):
                stale.unlink()

    graphdef, state = nnx.split(tokenizer)
    tokenize = make_tokenizer_fn(graphdef, tok_cfg)
    images_sharding = batch_sharding(mesh, 4)
    encode = jax.jit(lambda s, images: tokenize(s, images)[0], out_shardings=batch_sharding(mesh, 2))
    dtype = tokens.token_dtype(tok_cfg.vocab_size)
    image_size, train, seed = int(meta["image_size"]), meta["transform"] == "train", meta["seed"]

    def load(batch):
        shard, a, b = batch
        images = np.stack([tokens.crop(source, i, image_size, train=train, seed=seed) for i in range(a, b)])
        labels = np.array([source[i]["label"] for i in range(a, b)], np.int32)
        return {"shard": shard, "images": images, "labels": labels, "indices": np.arange(a, b, dtype=np.int64)}

    def ids_of(images):
        n = len(images)   # the last batch of a shard is padded to the compiled size
        padded = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
        ids = encode(state, jax.device_put(padded, images_sharding))
        return np.asarray(jax.device_get(ids))[:n].astype(dtype)

    batches = [(k, a, min(a + batch_size, ranges[k][1])) for k in todo for a in range(*ranges[k], batch_size)]
    loaded = iter(grain.MapDataset.source(batches).map(load).to_iter_dataset(
        grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)))
    total = sum(b - a for a, b in (ranges[k] for k in mine))
    with tqdm(total=total, initial=total - sum(b - a for a, b in (ranges[k] for k in todo)), unit="img",
              desc="tokenize", disable=process_index != 0) as progress:
        for k in todo:
            parts = []
            for _ in range(-(-(ranges[k][1] - ranges[k][0]) // batch_size)):
                batch = next(loaded)
                part = {"tokens": ids_of(batch["images"]), "labels": batch["labels"], "indices": batch["indices"]}
                if meta["flip"]:
                    part["tokens_flipped"] = ids_of(np.ascontiguousarray(batch["images"][:, :, ::-1]))
                parts.append(part)
                progress.update(len(batch["labels"]))
            tokens.write_shard(out, k, num_shards, {key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
    sync_hosts("var_jax.tokenize.shards_written")
    if process_index == 0:
        missing = [k for k in range(num_shards) if not (out / tokens.shard_name(k, num_shards)).exists()]
        if missing:
            raise CommandError(f"{out}: {len(missing)} shard(s) missing after tokenizing, e.g. "
                               f"{tokens.shard_name(missing[0], num_shards)} (is --out on storage every host "
                               f"shares?)")
        print(f"wrote {count} examples ({meta['seq_len']} tokens each{', with flips' if meta['flip'] else ''}) "
              f"in {num_shards} shards to {out}")
