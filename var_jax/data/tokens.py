"""Pre-tokenised data: the VAR stage's examples as per-scale token ids, encoded once by `var-jax tokenize`
(cli/tokenize.py) and read back as a grain source (`data.name='tokens'`, `data.dir`, optional `data.eval_dir`).

A token set is a directory:
    meta.json                  what the tokens are: format and version, the tokenizer (its config, patch_nums and
                               vocabulary among it, and `params_sha256`, a hash of its weights), image_size, count,
                               split, transform ('train': seeded random crops, 'eval': centre crops), seed, flip,
                               the image source's data config, seq_len, token dtype, shard_size, num_shards
    shard-00000-of-00004.npz   examples [k·shard_size, (k+1)·shard_size): 'tokens' (n, L) (the tokenizer's L ids of
                               every scale, concatenated in scale order; uint16 where V <= 65536, else int32),
                               'labels' (n,) int32, 'indices' (n,) int64 (the image's index in its split) and,
                               made with --flip, 'tokens_flipped' (n, L): the same crop mirrored left to right

Image i of the split is cropped as in training (transforms.preprocess) with a generator seeded by (seed, i), so
a token set is a function of its meta alone, whatever the number of hosts or the batch size that made it.

Why npz shards rather than ArrayRecord: a token set is small (2·L bytes an image: 260 B for the shapes latent-8
schedule, 1.3 KB at 256 px: 1.7 GB for ImageNet's train split, twice that with flips), so the reader holds it in
memory and grain's global shuffle reads any example at no cost; an .npz is one object, written atomically (a
temporary file renamed locally, one upload on gs://, paths.atomic_write) and read from a bucket in one request per
shard, where array_record's reader opens local paths only (google/array_record#120).

Flips: the training pipeline never flips by default (data.hflip, as the reference), so --flip stores a mirrored
copy of every example (as LlamaGen does) and the reader picks one of the two per example and epoch from the
pipeline's seeded per-position generator (pipeline._transform_example); held-out batches always take the
unflipped tokens. A set made with --flip is always read with its flips; data.hflip on a set without them is
refused (sources.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import jax
import numpy as np

from var_jax.data.transforms import preprocess
from var_jax.paths import atomic_write, read_bytes_many, read_json_object, user_path

FORMAT_NAME = "var-jax-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
# uint16 holds every id of a vocabulary up to this size (the released tokenizer's 4096 included)
UINT16_VOCAB_LIMIT = 2 ** 16


class TokenSetError(ValueError):
    """A token set that cannot be read or does not match the run; the message names the directory."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.int32)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.npz"


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every shard of a set of `count` examples."""
    return [(a, min(a + shard_size, count)) for a in range(0, count, shard_size)]


def crop(source, index: int, image_size: int, *, train: bool, seed: int) -> np.ndarray:
    """Image `index` of `source` as the token set holds it: uint8 (R, R, 3), the training transform with a
    generator seeded by (seed, index), or the evaluation transform (centre crop)."""
    rng = np.random.default_rng([int(seed), int(index)]) if train else None
    return preprocess(source[int(index)]["image"], image_size, train=train, rng=rng)


def write_shard(directory, index: int, count: int, arrays: dict) -> None:
    """One finished shard, atomically: a reader or a resumed run sees it whole or not at all."""
    atomic_write(user_path(directory) / shard_name(index, count), lambda f: np.savez(f, **arrays))


def params_sha256(module) -> str:
    """sha256 over a module's parameters (path, dtype, shape and bytes of each, in path order): the same for the
    same weights wherever they were loaded from (a model directory, a training workdir's export, a copy)."""
    from flax import nnx
    from jax.experimental import multihost_utils

    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:   # sharded over hosts
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def tokenizer_identity(tokenizer_cfg, tokenizer) -> dict:
    """meta.json's 'tokenizer' entry: the config that decides the tokens (patch_nums and vocab_size among it)
    and the weights' hash."""
    return {"config": json.loads(json.dumps(tokenizer_cfg.to_dict())), "params_sha256": params_sha256(tokenizer)}


def read_meta(directory) -> dict:
    directory = user_path(directory)
    path = directory / META_FILE
    meta = read_json_object(path, TokenSetError,
                            f"{directory} is not a token set; make one with `var-jax tokenize`")
    if meta.get("format") != FORMAT_NAME:
        raise TokenSetError(f"{path}: not a {FORMAT_NAME!r} file")
    if meta.get("version") != FORMAT_VERSION:
        raise TokenSetError(f"{path}: version {meta.get('version')!r} is not supported (this var-jax reads "
                            f"version {FORMAT_VERSION})")
    return meta


def check_matches(meta: dict, directory, run_tokenizer: dict, image_size: int) -> None:
    """Refuse a token set made with another tokenizer (config, scales, vocabulary or weights) or image size, in
    one line naming the first difference."""
    made, run = meta["tokenizer"], run_tokenizer
    where = f"{directory} was tokenized"
    if int(meta["image_size"]) != int(image_size):
        raise TokenSetError(f"{where} at image_size {meta['image_size']}, the run uses {image_size}")
    for field in ("patch_nums", "vocab_size"):
        if made["config"].get(field) != run["config"].get(field):
            raise TokenSetError(f"{where} with {field} {made['config'].get(field)}, the run's tokenizer has "
                                f"{run['config'].get(field)} (run `var-jax tokenize` with this config)")
    changed = sorted(k for k in set(made["config"]) | set(run["config"])
                     if made["config"].get(k) != run["config"].get(k))
    if changed:
        raise TokenSetError(f"{where} by a tokenizer with other settings ({', '.join(changed)}) than the run's "
                            f"tokenizer_checkpoint")
    if made["params_sha256"] != run["params_sha256"]:
        raise TokenSetError(f"{where} by a tokenizer with other weights (params sha256 {made['params_sha256'][:12]}"
                            f", the run's tokenizer_checkpoint {run['params_sha256'][:12]})")


class TokenSource:
    """A token set as a random-access grain source of {'tokens': (L,), 'label': int32, ['tokens_flipped']}, with
    `num_classes`, `meta` and `directory`; every shard is read into memory once (see the module docstring)."""

    def __init__(self, directory):
        self.directory = user_path(directory)
        self.meta = read_meta(self.directory)
        names = [shard_name(k, int(self.meta["num_shards"])) for k in range(int(self.meta["num_shards"]))]
        missing = [n for n in names if not (self.directory / n).exists()]
        if missing:
            raise TokenSetError(f"{self.directory} is incomplete: {len(missing)} of {len(names)} shards missing "
                                f"(e.g. {missing[0]}); rerun the same `var-jax tokenize` command to finish it")
        self.num_classes = int(self.meta["num_classes"])
        self.flip = bool(self.meta["flip"])
        keys = ("tokens", "labels", "indices") + (("tokens_flipped",) if self.flip else ())
        parts = {k: [] for k in keys}
        for name, content in zip(names, read_bytes_many([self.directory / n for n in names])):
            try:
                with np.load(io.BytesIO(content)) as shard:
                    for k in keys:
                        parts[k].append(shard[k])
            except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
                raise TokenSetError(f"{self.directory / name} is damaged ({e}); delete it and rerun the same "
                                    f"`var-jax tokenize` command to write it again") from None
        self.arrays = {k: np.concatenate(v) for k, v in parts.items()}
        if len(self.arrays["tokens"]) != int(self.meta["count"]):
            raise TokenSetError(f"{self.directory}: the shards hold {len(self.arrays['tokens'])} examples, "
                                f"{META_FILE} says {self.meta['count']}")

    def __len__(self) -> int:
        return len(self.arrays["labels"])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        example = {"tokens": self.arrays["tokens"][index], "label": np.int32(self.arrays["labels"][index])}
        if self.flip:
            example["tokens_flipped"] = self.arrays["tokens_flipped"][index]
        return example

    def __repr__(self) -> str:
        return f"TokenSource({self.directory}, split={self.meta['split']!r}, len={len(self)}, flip={self.flip})"


def token_example(example: dict, rng: np.random.Generator | None) -> dict:
    """A token source's example as the pipeline yields it: with flipped copies, one of the two drawn from `rng`
    (training: seeded by the stream position, so a new draw every epoch); without `rng` the unflipped one."""
    tokens = example["tokens"]
    if "tokens_flipped" in example and rng is not None and rng.random() < 0.5:
        tokens = example["tokens_flipped"]
    out = {"tokens": np.asarray(tokens), "label": np.int32(example["label"]), "skipped_images": np.int32(0)}
    if "mask" in example:      # held-out padding (pipeline.make_eval_dataset)
        out["mask"] = np.float32(example["mask"])
    return out
