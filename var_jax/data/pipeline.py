"""The grain input pipeline: shuffle, epochs, reference transforms, per-host shards, batches.

One global stream is defined for all hosts: a seeded shuffle of the source (a new order every epoch), the
epochs concatenated, each element transformed with a generator seeded by its position in the stream. Host p of
P then takes the p-th block of b = global_batch_size / P consecutive positions of every global batch. Global
batch k, assembled from the hosts' blocks in process order, is therefore the same examples in the same order,
with the same random crops, whatever the number of hosts (so per-row randomness such as class dropout does not
depend on it either); shards are disjoint and cover the stream.

Resuming needs no iterator state: a train step consumes one global batch, so a run resumed after k steps starts
the stream at global batch k (`start_batch`; `TrainBatches` for the trainer, which learns k only after restoring).
The batches are the ones an uninterrupted run sees, whatever the number of hosts or grain workers before and after.
The iterator (`iter(make_dataset(...))`) is still a grain DatasetIterator with `get_state()` / `set_state()`;
`checkpoint_save_args` / `checkpoint_restore_args` wrap that state for an orbax CheckpointManager (older training
checkpoints hold it, one file per process, as their `data` item; it is no longer read).

A pre-tokenised source (data/tokens.py, {'tokens', 'label'} examples cropped when they were tokenised) goes
through the same shuffle, epochs, host blocks and batches; only the per-example transform differs.

Images travel as uint8 (4× fewer bytes than float32 from the host to the devices); the jitted steps turn them
into the model's float32 [-1, 1] with transforms.to_model_range_on_device.

Held-out evaluation (`make_eval_dataset`): one pass in source order, centre crops, the last global batch padded
with repeats of real images and a 'mask' (1.0 real, 0.0 padding), so every image counts exactly once whatever the
batch size and number of hosts.
"""
from __future__ import annotations

import functools

import grain
import jax
import numpy as np
from absl import flags

from var_jax.data.tokens import token_example
from var_jax.data.transforms import preprocess
from var_jax.sharding import batch_sharding, data_parallel_size


def _transform_example(example: dict, rng: np.random.Generator | None, *, image_size: int, train: bool,
                       hflip: bool) -> dict:
    if "tokens" in example:    # pre-tokenised (data/tokens.py): cropped when tokenised; flipped copies drawn here
        return token_example(example, rng)
    image = preprocess(example["image"], image_size, train=train, rng=rng, hflip=hflip)
    # skipped_images: 1 where the source replaced an unreadable file by the next readable one (folder.py); it
    # travels with the example so that grain worker processes need no side channel, and the train step sums it.
    out = {"image": image, "label": np.int32(example["label"]),
           "skipped_images": np.int32(example.get("skipped_images", 0))}
    if "mask" in example:      # held-out padding (make_eval_dataset)
        out["mask"] = np.float32(example["mask"])
    return out


def _eval_example(example: dict, *, image_size: int) -> dict:
    return _transform_example(example, None, image_size=image_size, train=False, hflip=False)


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(index, count) of this host; defaults to jax.process_index() / jax.process_count()."""
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside [0, shard_count={shard_count})")
    return int(shard_index), int(shard_count)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    return num_examples // global_batch_size


def make_dataset(source, *, image_size: int, global_batch_size: int, seed: int, train: bool = True,
                 shard_index: int | None = None, shard_count: int | None = None, num_epochs: int | None = None,
                 worker_count: int = 0, hflip: bool = False, drop_remainder: bool = True, num_threads: int = 8,
                 prefetch_buffer_size: int = 8, start_batch: int = 0) -> grain.IterDataset:
    """Batches {'image': uint8 (B, R, R, 3), 'label': int32 (B,), 'skipped_images': int32 (B,)} for this host,
    B = global / hosts ('skipped_images': 1 where an unreadable file was replaced). The steps convert the images
    to [-1, 1] on the devices (transforms.to_model_range_on_device).

    train: seeded shuffle, random crops (and flips with `hflip`); otherwise source order and centre crops.
    num_epochs: None repeats forever. drop_remainder: the stream is cut to whole global batches, so every host
    yields the same number of batches (needed with several hosts). worker_count > 0 builds batches in that many
    grain worker processes (same batches, same order). num_threads batches are built concurrently by threads
    (in each worker), and up to prefetch_buffer_size batches are buffered: size it for memory.
    start_batch: the index of the first global batch to yield (this host's block of it); a run resumed after k
    train steps passes k.
    """
    batches = _host_batches(source, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
                            train=train, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                            hflip=hflip, drop_remainder=drop_remainder)
    return _iterate(batches, start_batch, worker_count=worker_count, num_threads=num_threads,
                    prefetch_buffer_size=prefetch_buffer_size)


def _host_batches(source, *, image_size: int, global_batch_size: int, seed: int, train: bool = True,
                  shard_index: int | None = None, shard_count: int | None = None, num_epochs: int | None = None,
                  hflip: bool = False, drop_remainder: bool = True) -> grain.MapDataset:
    """This host's batches as a lazy MapDataset: element k is its block of global batch k."""
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    if len(source) == 0:
        raise ValueError("data source is empty")
    if global_batch_size <= 0 or global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the number of "
                         f"hosts ({shard_count})")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if drop_remainder and num_epochs is not None and len(source) * num_epochs < global_batch_size:
        raise ValueError(f"{len(source)} examples × {num_epochs} epochs do not fill one global batch of "
                         f"{global_batch_size}")

    dataset = grain.MapDataset.source(source)
    if train:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)   # reseeds the shuffle every epoch
    if drop_remainder and num_epochs is not None:
        dataset = dataset[:len(dataset) // global_batch_size * global_batch_size]
    if train:
        dataset = dataset.random_map(functools.partial(_transform_example, image_size=image_size, train=True,
                                                       hflip=hflip), seed=seed)
    else:
        dataset = dataset.map(functools.partial(_eval_example, image_size=image_size))
    # Batched before the iterator, so that a batch is one element: grain worker processes then each build
    # whole batches and interleave them back in order, and the batches do not depend on worker_count.
    # MapDataset is lazy: a host only reads and transforms the blocks it keeps.
    batches = dataset.batch(global_batch_size // shard_count, drop_remainder=drop_remainder)
    return batches[shard_index::shard_count]


def _iterate(batches: grain.MapDataset, start_batch: int, *, worker_count: int, num_threads: int,
             prefetch_buffer_size: int) -> grain.IterDataset:
    if int(start_batch) < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    # Sliced before the iterator: no batch before the start is read or built, with or without grain workers.
    batches = batches[int(start_batch):].to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        _use_default_absl_flags()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return batches


class TrainBatches:
    """An iterator over this host's training batches (make_dataset's arguments) whose first batch can be chosen
    until one is drawn: `start_at(k)` after restoring a checkpoint of step k. The settings are checked here, and
    no batch is read before the first `next`."""

    def __init__(self, source, *, worker_count: int = 0, num_threads: int = 8, prefetch_buffer_size: int = 8,
                 **batch_settings):
        self._batches = _host_batches(source, **batch_settings)
        self._options = dict(worker_count=worker_count, num_threads=num_threads,
                             prefetch_buffer_size=prefetch_buffer_size)
        self._start, self._iterator = 0, None

    def start_at(self, batch_index: int):
        if self._iterator is not None:
            raise RuntimeError("start_at: batches were already drawn from this iterator")
        self._start = int(batch_index)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(_iterate(self._batches, self._start, **self._options))
        return next(self._iterator)


class PaddedSource:
    """`source` followed by repeats of its first images up to a multiple of `multiple`, each example with a
    'mask': 1.0 for the source's own images, 0.0 for the padding."""

    def __init__(self, source, multiple: int):
        self.source, self.num_real = source, len(source)
        self.size = -(-self.num_real // multiple) * multiple

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return {**self.source[index % self.num_real], "mask": np.float32(index < self.num_real)}


def make_eval_dataset(source, *, image_size: int, global_batch_size: int, shard_index: int | None = None,
                      shard_count: int | None = None, num_threads: int = 8, prefetch_buffer_size: int = 8):
    """One pass over the whole `source` as make_dataset(train=False) batches with a 'mask' (B,) float32 entry;
    iterate it again (`iter(...)`) for the next evaluation."""
    return make_dataset(PaddedSource(source, global_batch_size), image_size=image_size,
                        global_batch_size=global_batch_size, seed=0, train=False, shard_index=shard_index,
                        shard_count=shard_count, num_epochs=1, num_threads=num_threads,
                        prefetch_buffer_size=prefetch_buffer_size)


def _use_default_absl_flags():
    """grain's worker processes read absl flags (--grain_*); outside absl.app (argparse CLI, pytest) nothing has
    parsed them, so accept their defaults instead of failing."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def checkpoint_save_args(iterator):
    """orbax args that save a grain iterator's position, e.g.
    `manager.save(step, args=ocp.args.Composite(state=..., data=checkpoint_save_args(it)))`."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator):
    """orbax args that restore a grain iterator in place (it continues with the next unseen batch)."""
    return grain.checkpoint.CheckpointRestore(iterator)


def global_batch_from_host(local_batch, mesh):
    """This host's batch (a pytree of numpy arrays) -> global jax.Arrays, leading axis over the mesh's data axes.

    Each host's rows land on its own devices; the global batch size is local size × number of hosts."""

    def one(x):
        x = np.asarray(x)
        global_size = x.shape[0] * jax.process_count()
        if global_size % data_parallel_size(mesh):
            raise ValueError(f"global batch {global_size} (leading axis of shape {x.shape} × "
                             f"{jax.process_count()} hosts) is not divisible by the {data_parallel_size(mesh)} "
                             f"data-parallel devices of the mesh")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, local_batch)
