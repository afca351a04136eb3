"""A classifier of the procedural shapes (var_jax/data/shapes.py), to score class-conditional samples of a model
trained on them, as digits_classifier does for digits (same `score` / `accuracy` / `in_distribution` interface).

Shapes differ in outline only; colour, position, size and rotation are nuisances. The features remove them:
the foreground mask is each pixel's RGB distance from the background colour (the median of the image border),
relative to the largest; it is resampled on a polar grid around the mask's centroid with radii relative to the
mask's equal-area radius (translation and scale gone), and each radius ring is reduced to the magnitudes of its
first angular Fourier harmonics (rotation, a circular shift along the angle, gone). An RBF support-vector
machine (scikit-learn) on these features is trained on FIT_IMAGES images of the 'train' split rendered as the
training pipeline shows them (reference resize + seeded random crops); `held_out_accuracy` is measured on the
first HELD_OUT_IMAGES images of the held-out 'val' split (centre crops).

Usage: `shapes_classifier(32).score(samples, requested_labels)` -> {'accuracy', 'in_distribution', ...}.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy.ndimage import map_coordinates
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from var_jax.data import shapes
from var_jax.data.transforms import preprocess, to_model_range
from var_jax.eval.digits_classifier import IN_DISTRIBUTION_QUANTILE, DigitsClassifier
from var_jax.images import to_unit_range

FIT_IMAGES = 4000            # training images for the SVM (a few seconds to render and fit)
HELD_OUT_IMAGES = 1000
POLAR_RADII = 12             # rings of the polar grid
POLAR_ANGLES = 32            # samples per ring
MAX_RELATIVE_RADIUS = 2.0    # outermost ring, in equal-area radii: covers a bar's (the longest shape's) ends
HARMONICS = 7                # angular harmonics kept per ring: a star needs 5


def _unit_images(images) -> np.ndarray:
    """NHWC uint8 in [0, 255] or float in [-1, 1] -> float32 in [0, 1], 3 channels."""
    unit = to_unit_range(images, shapes.MIN_RESOLUTION)
    return np.broadcast_to(unit, unit.shape[:3] + (3,))


def foreground_masks(images) -> np.ndarray:
    """float32 (N, H, W) in [0, 1]: distance from the border's median colour, relative to the image's largest."""
    unit = _unit_images(images)
    border = np.concatenate([unit[:, 0], unit[:, -1], unit[:, :, 0], unit[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None, :]
    distance = np.linalg.norm(unit - background, axis=-1)
    return distance / np.maximum(distance.max(axis=(1, 2), keepdims=True), 1e-6)


def shape_features(images) -> np.ndarray:
    """float32 (N, POLAR_RADII · HARMONICS): translation-, scale- and rotation-invariant outline features."""
    masks = foreground_masks(images)
    n, h, w = masks.shape
    rows, cols = np.mgrid[0:h, 0:w]
    radii = (np.arange(POLAR_RADII) + 0.5) / POLAR_RADII * MAX_RELATIVE_RADIUS
    angles = np.arange(POLAR_ANGLES) * 2 * np.pi / POLAR_ANGLES
    out = np.empty((n, POLAR_RADII * HARMONICS), np.float32)
    for i, mask in enumerate(masks):
        mass = max(float(mask.sum()), 1e-6)
        cy, cx = float((mask * rows).sum()) / mass, float((mask * cols).sum()) / mass
        scale = np.sqrt(mass / np.pi)
        r = radii[:, None] * scale
        polar = map_coordinates(mask, [cy + r * np.sin(angles), cx + r * np.cos(angles)], order=1, mode="constant")
        out[i] = (np.abs(np.fft.rfft(polar, axis=1))[:, :HARMONICS] / POLAR_ANGLES).ravel()
    return out


def render_like_pipeline(indices, resolution: int, *, train: bool, rng: np.random.Generator | None = None,
                         seed: int = shapes.DATA_SEED) -> np.ndarray:
    """Images `indices` of the index space -> float32 (N, R, R, 3) in [-1, 1] through the reference transform."""
    return to_model_range(np.stack([
        preprocess(shapes.render(i, resolution, seed), resolution, train=train, rng=rng) for i in indices]))


class ShapesClassifier(DigitsClassifier):
    """DigitsClassifier's scoring (accuracy, in-distribution share, predicted counts) on shape features."""

    @classmethod
    def fit(cls, resolution: int = 32, seed: int = 0) -> "ShapesClassifier":
        rng = np.random.default_rng(seed)
        start, _ = shapes.split_range("train")
        train_indices = np.arange(start, start + FIT_IMAGES)
        features = shape_features(render_like_pipeline(train_indices, resolution, train=True, rng=rng))
        model = make_pipeline(StandardScaler(), SVC(gamma="scale")).fit(
            features, [shapes.label_of(i) for i in train_indices])
        scaler = model[0]
        neighbours = NearestNeighbors(n_neighbors=1).fit(scaler.transform(features))

        held_out_indices = np.arange(*shapes.split_range("val"))[:HELD_OUT_IMAGES]
        held_out_features = shape_features(render_like_pipeline(held_out_indices, resolution, train=False))
        labels = np.array([shapes.label_of(i) for i in held_out_indices])
        held_out = float(np.mean(model.predict(held_out_features) == labels))
        distances = neighbours.kneighbors(scaler.transform(held_out_features))[0][:, 0]
        threshold = float(np.quantile(distances, IN_DISTRIBUTION_QUANTILE))
        return cls(model, neighbours, threshold, resolution, held_out)

    def predict(self, images) -> np.ndarray:
        return self.model.predict(shape_features(images)).astype(np.int32)

    def in_distribution(self, images) -> np.ndarray:
        """bool (N,): as close to some training shape (standardised features) as 95% of held-out shapes are."""
        features = self.model[0].transform(shape_features(images))
        return self.neighbours.kneighbors(features)[0][:, 0] <= self.distance_threshold


@functools.lru_cache(maxsize=4)
def shapes_classifier(resolution: int = 32, seed: int = 0) -> ShapesClassifier:
    """The classifier for samples at `resolution`, trained once per process (seconds)."""
    return ShapesClassifier.fit(resolution, seed)
