"""A feature network for the embedded digits, trained inside the project (deterministic, no download), so that
`eval --features digits` can give FID, sFID, IS, precision and recall where Inception means nothing.

The network: images -> the digits' native form (grey, 8×8 block means on 0..16, `to_digit_features`) / 16 ->
a 64-unit ReLU layer -> 10 classes: scikit-learn's MLPClassifier (L-BFGS, 100 iterations, random_state 0,
one BLAS thread: deterministic, about a second) trained on the 'train' split rendered as the training pipeline shows it (reference centre crop plus two seeded random crops per digit,
as the digits classifier is). Outputs, mirroring the Inception ones:
  pool     the 64 hidden activations           -> FID, precision, recall;
  spatial  the 64 normalised 8×8 pixels         -> sFID (a pixel-space Fréchet distance here, not spatial
                                                   network features: the network has none);
  probs    softmax(hidden @ W_out), bias left out as the ADM evaluator does for IS -> Inception Score.
Training takes a few seconds and is cached per process. `NETWORK_ID` names this recipe in stats files and
metrics; change it when the recipe changes.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
from scipy.special import softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits

from var_jax.data import digits
from var_jax.data.transforms import from_model_range
from var_jax.eval.digits_classifier import RANDOM_CROPS_PER_DIGIT, render_like_pipeline, to_digit_features

NETWORK_ID = "digits-mlp64-v1"
HIDDEN = 64
FEATURE_RESOLUTION = 32   # the renders the network is trained on; inputs of any size are block-averaged to 8×8


class DigitsFeatureNet:
    def __init__(self, mlp, held_out_accuracy: float):
        self.held_out_accuracy = held_out_accuracy
        self.hidden_weights = mlp.coefs_[0].astype(np.float64)
        self.hidden_bias = mlp.intercepts_[0].astype(np.float64)
        self.out_weights = mlp.coefs_[1].astype(np.float64)

    @classmethod
    def fit(cls, seed: int = 0) -> "DigitsFeatureNet":

        rng = np.random.default_rng(seed)
        train_digits, train_labels = digits.native_digits("train")
        renders = [render_like_pipeline(train_digits, FEATURE_RESOLUTION, train=False)]
        renders += [render_like_pipeline(train_digits, FEATURE_RESOLUTION, train=True, rng=rng)
                    for _ in range(RANDOM_CROPS_PER_DIGIT)]
        x = np.concatenate([to_digit_features(r) for r in renders]) / digits.MAX_VALUE
        mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="relu", solver="lbfgs", max_iter=100,
                            random_state=seed)
        # one BLAS thread: the same result on every machine, and far faster than threads for matrices this small
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp.fit(x, np.tile(train_labels, len(renders)))
        test_digits, test_labels = digits.native_digits("test")
        test_x = to_digit_features(render_like_pipeline(test_digits, FEATURE_RESOLUTION, train=False))
        accuracy = float(np.mean(mlp.predict(test_x / digits.MAX_VALUE) == test_labels))
        return cls(mlp, accuracy)

    def features(self, images) -> dict[str, np.ndarray]:
        """uint8 NHWC images (1 or 3 channels, sides >= 8) -> {'pool', 'spatial', 'probs'} as float32."""

        pixels = to_digit_features(images).astype(np.float64) / digits.MAX_VALUE
        hidden = np.maximum(pixels @ self.hidden_weights + self.hidden_bias, 0.0)
        probs = softmax(hidden @ self.out_weights, axis=1)
        return {"pool": hidden.astype(np.float32), "spatial": pixels.astype(np.float32),
                "probs": probs.astype(np.float32)}


@functools.lru_cache(maxsize=2)
def digits_feature_net(seed: int = 0) -> DigitsFeatureNet:
    return DigitsFeatureNet.fit(seed)


def real_digits(split: str, resolution: int) -> np.ndarray:
    """uint8 (N, R, R, 3): a digits split rendered as the training pipeline shows it at evaluation (centre crop)."""
    native, _ = digits.native_digits(split)
    return np.ascontiguousarray(from_model_range(render_like_pipeline(native, resolution, train=False)))
