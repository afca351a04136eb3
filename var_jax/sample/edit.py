"""Zero-shot editing (the reference's `demo_zero_shot_edit.ipynb`): in-painting, out-painting and
class-conditional editing with the plain sampler.

The source image is tokenized; at every scale, after the sampler draws its tokens and before the next scale's
input is built, the positions of the keep mask take the source image's tokens (h = E[gt]·m + h·(1−m)), so only the
rest is regenerated, conditioned on what is kept. `inpaint` regenerates inside the box / white mask pixels,
`outpaint` regenerates outside. With the null class (label None) the model fills in unconditionally; with a real
class the regenerated part is drawn towards that class.

    out = edit(bundle, image_uint8, box=(0.25, 0.25, 0.75, 0.75), mode="inpaint")
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from var_jax.data.transforms import to_model_range
from var_jax.sample.masks import box_keep_mask, image_keep_mask, scale_keep_masks
from var_jax.sample.runner import Sampler
from var_jax.sample.sampler import SampleOptions
from var_jax.tokenizer.vqvae import image_to_tokens

# The notebook's editing call: cfg 3, top-k 900, top-p 0.95.
EDIT_OPTIONS = SampleOptions(cfg=3.0, top_k=900, top_p=0.95)


def source_tokens(tokenizer, images_uint8: np.ndarray) -> list[np.ndarray]:
    """uint8 (B, H, W, 3) -> per-scale token maps (B, pn²) int32 of the tokenizer."""
    images = np.asarray(images_uint8)
    size = tokenizer.cfg.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, {size}, {size}, 3) for this tokenizer, got "
                         f"{images.dtype} {images.shape}")
    graphdef, state = nnx.split(tokenizer)
    tokens = _encoder(graphdef)(state, to_model_range(images))
    return [np.asarray(t) for t in tokens]


@functools.lru_cache(maxsize=4)
def _encoder(graphdef):
    return jax.jit(lambda state, x: image_to_tokens(nnx.merge(graphdef, state), x))


def keep_mask_for(latent_size: int, mode: str, box=None, mask=None) -> np.ndarray:
    """Latent-resolution keep mask from exactly one of a box (y0, x0, y1, x1 fractions) or a mask image
    (H, W) in [0, 1], white = the marked region."""
    if (box is None) == (mask is None):
        raise ValueError("give exactly one of box=(y0, x0, y1, x1) or mask=<(H, W) array>")
    return box_keep_mask(latent_size, box, mode) if box is not None else image_keep_mask(mask, latent_size, mode)


def edit(bundle, image: np.ndarray, *, box=None, mask=None, mode: str = "inpaint", label: int | None = None,
         seed: int = 0, options: SampleOptions = EDIT_OPTIONS, mesh=None, refiner=None) -> dict:
    """Edit one uint8 (H, W, 3) image (H = W = the tokenizer's image size). options.accel and `refiner` (a
    model bundle of the same tokenizer, with options.accel.draft_scales) are the sampling accelerators.

    Returns {'image': uint8 (H, W, 3), 'tokens': per-scale (1, pn²) tokens of the result, 'source_tokens': those
    of the input, 'keep': per-scale (pn, pn) bool keep masks}."""
    tok_cfg = bundle.tokenizer_config
    keep = scale_keep_masks(keep_mask_for(tok_cfg.latent_size, mode, box, mask), tok_cfg.patch_nums)
    src = source_tokens(bundle.tokenizer, np.asarray(image)[None])
    label = bundle.var_config.num_classes if label is None else int(label)
    if not 0 <= label <= bundle.var_config.num_classes:
        raise ValueError(f"class {label} out of range: this model has classes 0..{bundle.var_config.num_classes - 1}"
                         f" ({bundle.var_config.num_classes} or none = unconditional)")
    edit_inputs = (src, [k.reshape(1, -1) for k in keep])
    out = Sampler(bundle, options, mesh, refiner=refiner)(np.asarray([label]), seed=seed, edit=edit_inputs)
    return {"image": out["images"][0], "tokens": out["tokens"], "source_tokens": src, "keep": keep}
