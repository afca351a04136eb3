"""A classifier of the real handwritten digits, to score class-conditional samples of a model trained on them.

Images of any resolution are brought back to the digits' native form: grey level, area-averaged to 8×8
(PIL's BOX filter), intensities on the original 0..16 scale. The classifier (an RBF support-vector machine,
scikit-learn) is trained on the digits' fixed 'train' split rendered exactly as the training pipeline shows them
to a model (upscaled, then the reference centre crop and seeded random crops), so generated samples are judged
on the distribution the generator learned. Its accuracy on the held-out 'test' split (rendered the same way) is
`held_out_accuracy`.

A classifier names a class for any input, noise included, so `score` also reports `in_distribution`: the share
of images whose nearest real training digit (8×8 features) is no farther than for 95% of held-out real digits
(real digits score ≈ 0.95, noise and blank images ≈ 0).

Usage: `digits_classifier(32).score(samples, requested_labels)` -> {'accuracy', 'in_distribution', ...}.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import SVC

from var_jax.data import digits
from var_jax.data.transforms import preprocess, to_model_range
from var_jax.images import to_unit_range

RANDOM_CROPS_PER_DIGIT = 2   # augmentation: samples are drawn like training images, i.e. from random crops
IN_DISTRIBUTION_QUANTILE = 0.95   # of held-out real digits' nearest-neighbour distances


def to_digit_features(images) -> np.ndarray:
    """NHWC images (uint8 in [0, 255] or float in [-1, 1], 1 or 3 channels) -> float32 (N, 64) on the 0..16 scale."""
    gray = to_unit_range(images, digits.NATIVE_SIZE).mean(axis=-1)
    native = (digits.NATIVE_SIZE, digits.NATIVE_SIZE)
    small = np.stack([np.asarray(Image.fromarray(g).resize(native, Image.Resampling.BOX)) for g in gray])
    return (small * digits.MAX_VALUE).reshape(len(gray), -1).astype(np.float32)


def render_like_pipeline(native: np.ndarray, resolution: int, *, train: bool,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """8×8 digits -> float32 (N, R, R, 3) in [-1, 1] through the digits source and the reference transform."""
    return to_model_range(np.stack([
        preprocess(digits.upscale_digit(d, resolution), resolution, train=train, rng=rng) for d in native]))


class DigitsClassifier:
    def __init__(self, model, neighbours, distance_threshold: float, resolution: int, held_out_accuracy: float):
        self.model = model
        self.neighbours = neighbours
        self.distance_threshold = distance_threshold
        self.resolution = resolution
        self.held_out_accuracy = held_out_accuracy

    @classmethod
    def fit(cls, resolution: int = 32, seed: int = 0) -> "DigitsClassifier":
        rng = np.random.default_rng(seed)
        train_digits, train_labels = digits.native_digits("train")
        renders = [render_like_pipeline(train_digits, resolution, train=False)]
        renders += [render_like_pipeline(train_digits, resolution, train=True, rng=rng)
                    for _ in range(RANDOM_CROPS_PER_DIGIT)]
        features = np.concatenate([to_digit_features(r) for r in renders])
        model = SVC(gamma="scale").fit(features, np.tile(train_labels, len(renders)))
        neighbours = NearestNeighbors(n_neighbors=1).fit(features)

        test_digits, test_labels = digits.native_digits("test")
        test_features = to_digit_features(render_like_pipeline(test_digits, resolution, train=False))
        held_out = float(np.mean(model.predict(test_features) == test_labels))
        threshold = float(np.quantile(neighbours.kneighbors(test_features)[0][:, 0], IN_DISTRIBUTION_QUANTILE))
        return cls(model, neighbours, threshold, resolution, held_out)

    def predict(self, images) -> np.ndarray:
        return self.model.predict(to_digit_features(images)).astype(np.int32)

    def in_distribution(self, images) -> np.ndarray:
        """bool (N,): the image is as close to some real training digit as 95% of held-out real digits are."""
        distances = self.neighbours.kneighbors(to_digit_features(images))[0][:, 0]
        return distances <= self.distance_threshold

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == _checked_labels(labels, images)))

    def score(self, images, labels) -> dict:
        """Class-conditional sample quality: accuracy against the requested labels, the in-distribution share,
        and how many images were predicted as each class."""
        labels = _checked_labels(labels, images)
        predicted = self.predict(images)
        return {"accuracy": float(np.mean(predicted == labels)),
                "in_distribution": float(np.mean(self.in_distribution(images))),
                "predicted_counts": np.bincount(predicted, minlength=digits.NUM_CLASSES).tolist()}


def _checked_labels(labels, images) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels of shape {labels.shape} do not match {len(images)} images")
    return labels


@functools.lru_cache(maxsize=4)
def digits_classifier(resolution: int = 32, seed: int = 0) -> DigitsClassifier:
    """The classifier for samples at `resolution`, trained once per process (a few seconds)."""
    return DigitsClassifier.fit(resolution, seed)
