"""How well a tokenizer reconstructs held-out shapes: PSNR, and the shapes classifier's accuracy on the
reconstructions. Every sample a VAR model draws is decoded by this decoder, so the accuracy here is the ceiling
of the sample metrics downstream.

    from var_jax.eval.reconstruction import shapes_reconstruction_quality
    shapes_reconstruction_quality("workdirs/shapes_tokenizer", num_images=1000)
    # {'psnr': ..., 'recon_accuracy': ..., 'real_accuracy': ..., 'recon_in_distribution': ..., ...}

The images are the first `num_images` of the held-out 'val' split from `start` (centre crops, as the training
pipeline renders them; by default the images on which the shapes classifier's own held-out accuracy is measured,
so `real_accuracy` and `recon_accuracy` are over the same shapes). PSNR is per image on uint8 pixels, then
averaged (var_jax/eval/metrics.psnr_per_image), as `python -m var_jax reconstruct` prints it.
"""
from __future__ import annotations

import numpy as np

from var_jax.data import shapes

DEFAULT_IMAGES = 1000
BATCH_SIZE = 100


def tokenizer_model_dir(path):
    """A tokenizer training workdir's exported model (WORKDIR/model), or `path` when it is a model directory."""
    from var_jax.paths import user_path
    from var_jax.train.workdir import Workdir
    path = user_path(path)
    return Workdir(path).model if Workdir(path).finished() else path


def reconstruct(tokenizer, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """float32 (N, H, W, 3) in [-1, 1] -> uint8 reconstructions (encode, quantize over every scale, decode), one
    compiled batch shape (the last batch padded)."""
    import jax
    from flax import nnx

    from var_jax.cli.reconstruct import compiled_reconstruct_batch
    from var_jax.data.transforms import from_model_range

    graphdef, state = nnx.split(tokenizer)
    step = compiled_reconstruct_batch()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        out.append(from_model_range(jax.device_get(step(graphdef, state, batch)[0])[:real]))
    return np.concatenate(out)


def shapes_reconstruction_quality(tokenizer_path, num_images: int = DEFAULT_IMAGES, start: int = 0,
                                  batch_size: int = BATCH_SIZE) -> dict:
    """{'psnr', 'recon_accuracy', 'real_accuracy', 'recon_in_distribution', 'num_images', 'first_index',
    'image_size'} of a shapes tokenizer (a training workdir or a model directory) on held-out shapes."""
    from var_jax.checkpoints import load_model_dir
    from var_jax.data.transforms import from_model_range
    from var_jax.eval.metrics import psnr_per_image
    from var_jax.eval.shapes_classifier import render_like_pipeline, shapes_classifier

    held_out_start, held_out_stop = shapes.split_range("val")
    if num_images < 1 or start < held_out_start or start + num_images > held_out_stop:
        raise ValueError(f"reconstruction images [{start}, {start + num_images}) must lie in the held-out range "
                         f"[{held_out_start}, {held_out_stop})")
    bundle = load_model_dir(tokenizer_model_dir(tokenizer_path))
    if bundle.tokenizer is None:
        raise ValueError(f"{tokenizer_path}: holds no tokenizer")
    resolution = bundle.tokenizer_config.image_size
    indices = np.arange(start, start + num_images)
    real = render_like_pipeline(indices, resolution, train=False)
    reconstructions = reconstruct(bundle.tokenizer, real, min(batch_size, num_images))
    labels = np.array([shapes.label_of(i) for i in indices])
    classifier = shapes_classifier(resolution)
    psnr = psnr_per_image(reconstructions, from_model_range(real))
    return {"psnr": float(np.mean(psnr)),
            "recon_accuracy": classifier.accuracy(reconstructions, labels),
            "real_accuracy": classifier.accuracy(real, labels),
            "recon_in_distribution": float(np.mean(classifier.in_distribution(reconstructions))),
            "num_images": int(num_images), "first_index": int(start), "image_size": int(resolution)}
