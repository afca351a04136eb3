"""Host-side driver of the jitted sampler: parameters and batches placed on the mesh, numpy in and out.

    sampler = Sampler(bundle, SampleOptions(cfg=1.5, top_k=900, top_p=0.96), mesh=make_mesh((-1, 1, 1)))
    out = sampler(labels, image_ids=np.arange(8), seed=0)      # out['images']: uint8 (8, 256, 256, 3)

Parameters are sharded as in training (`state_shardings`), the batch over the data axes (`batch_sharding`); a
batch that the data-parallel size does not divide is padded with extra rows that are dropped again.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
from flax import nnx

from var_jax.host_memory import release_freed_memory
from var_jax.images import to_uint8
from var_jax.sample.accelerate import check_same_tokenizer
from var_jax.sample.sampler import SampleOptions, make_sample_fn
from var_jax.sharding import batch_sharding, data_parallel_size, state_shardings
from var_jax.tokenizer.vqvae import split_for_decoding


def check_labels(labels, num_classes: int, allow_null: bool = True) -> np.ndarray:
    """Labels as int32, or a ValueError naming the offending ids. The null class (num_classes) is allowed when
    `allow_null` (unconditional sampling, editing)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    top = num_classes if allow_null else num_classes - 1
    bad = sorted(set(int(v) for v in labels[(labels < 0) | (labels > top)]))
    if bad:
        raise ValueError(f"class ids {bad[:10]} out of range: this model has classes 0..{num_classes - 1}"
                         + (f" (and {num_classes} = unconditional)" if allow_null else ""))
    return labels.astype(np.int32)


class Sampler:
    """Compiled sampler of one model bundle and one set of options (compiles once per batch shape)."""

    def __init__(self, bundle, options: SampleOptions = SampleOptions(), mesh=None, *, with_logits: bool = False,
                 refiner=None):
        """refiner: the model bundle (a VAR, its tokenizer optional) drawing the scales from
        options.accel.draft_scales on; a tokenizer it carries must be the main model's."""
        if bundle.var is None or bundle.tokenizer is None:
            raise ValueError("sampling needs a model directory with both a tokenizer and a VAR transformer")
        self.options = options.validate()
        self.mesh = mesh
        self.num_classes = bundle.var_config.num_classes
        var_graphdef, var_state = nnx.split(bundle.var)
        # sampling never encodes: the encoder's weights are not kept (a caller that drops the bundle frees them)
        tok_graphdef, tok_state, encoder_spec = split_for_decoding(bundle.tokenizer)
        if mesh is not None:
            var_state = jax.device_put(var_state, state_shardings(var_state, mesh))
            tok_state = jax.device_put(tok_state, state_shardings(tok_state, mesh))
        self._states = (var_state, tok_state)
        refiner_graphdef, self._refiner_state = None, None
        if refiner is not None:
            check_same_tokenizer(bundle, refiner)
            refiner_graphdef, self._refiner_state = nnx.split(refiner.var)
            if mesh is not None:
                self._refiner_state = jax.device_put(self._refiner_state,
                                                     state_shardings(self._refiner_state, mesh))
        self._fn = make_sample_fn(var_graphdef, tok_graphdef, self.options, with_logits=with_logits,
                                  encoder_spec=encoder_spec, refiner_graphdef=refiner_graphdef)
        self._compiled = {}
        self._with_logits = with_logits

    @property
    def batch_multiple(self) -> int:
        return 1 if self.mesh is None else data_parallel_size(self.mesh)

    def _place(self, x):
        return x if self.mesh is None else jax.device_put(x, batch_sharding(self.mesh, np.ndim(x)))

    def __call__(self, labels, image_ids=None, seed: int = 0, edit=None, pad_to: int | None = None) -> dict:
        """labels (B,) -> {'images': uint8 (B, H, W, 3), 'tokens': list of (B, pn²) int32[, 'logits']}.
        image_ids (default 0..B-1) pick each image's random stream; edit: (source_tokens, keep) per-scale lists of
        (B, pn²) arrays (see edit.py). pad_to: run a batch of at least this size (a short last batch then reuses
        the compiled full-batch function)."""
        labels = check_labels(labels, self.num_classes)
        batch = len(labels)
        image_ids = np.arange(batch) if image_ids is None else np.asarray(image_ids)
        if image_ids.shape != (batch,):
            raise ValueError(f"image_ids must have shape ({batch},) like labels, got {image_ids.shape}")
        padded = -(-max(batch, pad_to or 0) // self.batch_multiple) * self.batch_multiple
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], padded - batch, axis=0)]) if padded > batch else x
        args = [self._place(pad(labels)), self._place(pad(image_ids.astype(np.uint32)))]
        if edit is not None:
            edit = jax.tree.map(lambda x: self._place(pad(np.asarray(x))), edit)
        args = (*self._states, *args, np.uint32(seed), edit, self._refiner_state)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            key = (padded, edit is None)
            if key not in self._compiled:
                self._compiled[key] = self._fn.lower(*args).compile()
                release_freed_memory()   # the compiler's freed heap, before the program's buffers come on top
            out = self._compiled[key](*args)
        result = {"images": to_uint8(np.asarray(out["images"])[:batch]),
                  "tokens": [np.asarray(t)[:batch] for t in out["tokens"]]}
        if self._with_logits:
            result["logits"] = [np.asarray(lg)[:batch] for lg in out["logits"]]
        return result


def sample_images(bundle, labels, seed: int = 0, mesh=None, **options) -> np.ndarray:
    """uint8 images (B, H, W, 3) for `labels` (e.g. for a PNG grid during training); options are SampleOptions
    fields (cfg, top_k, top_p, more_smooth, mode, ...). Compiles on every call: keep a `Sampler` to reuse."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(SampleOptions)})
    if unknown:
        raise ValueError(f"sample_images: unknown option(s) {unknown}")
    return Sampler(bundle, SampleOptions(**options), mesh)(labels, seed=seed)["images"]
