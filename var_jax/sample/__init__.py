"""Sampling from a trained VAR: the scale-by-scale sampler and zero-shot editing.

    from var_jax.sample import Sampler, SampleOptions, sample_images, edit

- filtering.py  top-k / top-p filtering, guidance mixing, the token draw and the Gumbel `more_smooth` path
- bitwise.py    the per-bit draw of a bitwise head (the same options, applied to each bit's two values)
- schedule.py   which scales are unrolled and which share one scanned step (the sampler modes)
- sampler.py    the jitted pure sampler: (parameters, labels, image ids, seed) -> tokens, f_hat, images
- runner.py     host driver: mesh placement, batch padding, numpy in/out, `sample_images`
- accelerate.py the sampling accelerators (cfg stop, refiner, pruning, KV window): settings, checks, static plan;
  cache_layout.py, accelerated_forward.py and accelerated_walk.py carry them out
- masks.py      edit masks (box / image) resized per scale like the reference notebook
- edit.py       in-painting, out-painting, class-conditional editing
"""
from var_jax.sample.edit import edit
from var_jax.sample.runner import Sampler, sample_images
from var_jax.sample.sampler import SampleOptions

__all__ = ["Sampler", "SampleOptions", "sample_images", "edit"]
