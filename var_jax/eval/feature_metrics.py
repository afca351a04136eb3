"""Sample-quality metrics on network features, as OpenAI's ADM evaluator (guided-diffusion/evaluations) defines
them: FID, sFID, Inception Score, precision and recall.

* Statistics (`MomentAccumulator`): mean and covariance in float64, accumulated batch by batch from running sums
  of x and x xᵀ (shifted by the first batch's mean, which keeps the sums well conditioned); the covariance is
  the unbiased one (n − 1), as `np.cov(features, rowvar=False)` gives.
* `frechet_distance`: ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrtm(Σ1 Σ2), with `scipy.linalg.sqrtm`. As the evaluator
  does: when the square root is not finite, eps·I (1e-6) is added to both covariances and it is taken again; a
  complex result whose diagonal has an imaginary part above 1e-3 is an error, otherwise the real part is kept.
* `InceptionScoreAccumulator`: exp(mean_i KL(p_i ‖ p̄)) per split of `split_size` consecutive images (5,000:
  ten splits for 50,000), the mean over splits. A set with fewer images than one split is one split; a last
  partial split counts as a split of its own (the evaluator's `range(0, n, split_size)`). Accumulated
  incrementally from mean_i Σ p log p − Σ p̄ log p̄, which equals the evaluator's formula; 0·log 0 is taken as
  0 (the evaluator would give NaN on an exactly-zero probability).
* `precision_recall`: k-nearest-neighbour manifolds (k = 3): each feature's radius is its squared distance to
  its k-th nearest neighbour in its own set (itself counted at distance 0, as the evaluator's partition does);
  precision = share of samples inside some reference ball (distance² ≤ radius), recall = share of references
  inside some sample ball. Distances are computed in float32 blocks on the devices (jitted, rows sharded); the
  evaluator tries float16 first and falls back to float32, which we do not copy.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg
from scipy.special import xlogy

from var_jax.sharding import batch_sharding, data_parallel_size

FID_EPS = 1e-6
IS_SPLIT_SIZE = 5000
NEAREST_K = 3
DISTANCE_BLOCK = 10000


class MomentAccumulator:
    """Running float64 mean and covariance of feature vectors."""

    def __init__(self):
        self.count = 0
        self._shift = self._sum = self._outer = None

    def update(self, x) -> None:
        x = np.asarray(x, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got {x.shape}")
        if len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]), np.float64)
        d = x - self._shift
        self._sum += d.sum(axis=0)
        self._outer += d.T @ d
        self.count += len(x)

    @property
    def mean(self) -> np.ndarray:
        return self._shift + self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return (self._outer - np.outer(self._sum, self._sum) / self.count) / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FID_EPS) -> float:

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():   # scipy's "matrix is singular" note: the finiteness check below decides
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product of covariances; adding {eps} to their diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class InceptionScoreAccumulator:
    """Inception Score from class probabilities given batch by batch (see the module docstring)."""

    def __init__(self, split_size: int = IS_SPLIT_SIZE):
        if split_size < 1:
            raise ValueError(f"split_size must be positive, got {split_size}")
        self.split_size = split_size
        self.split_scores: list[float] = []
        self.count = 0
        self._n = 0
        self._plogp = 0.0
        self._psum = None

    def update(self, probs) -> None:
        probs = np.asarray(probs, np.float64)
        while len(probs):
            take = self.split_size - self._n
            part, probs = probs[:take], probs[take:]
            if self._psum is None:
                self._psum = np.zeros(part.shape[1], np.float64)
            self._psum += part.sum(axis=0)
            self._plogp += float(xlogy(part, part).sum())
            self._n += len(part)
            self.count += len(part)
            if self._n == self.split_size:
                self._close_split()

    def _close_split(self) -> None:
        mean = self._psum / self._n
        kl = self._plogp / self._n - float(xlogy(mean, mean).sum())
        self.split_scores.append(float(np.exp(kl)))
        self._n, self._plogp, self._psum = 0, 0.0, None

    def result(self) -> float:
        if self._n:
            self._close_split()
        if not self.split_scores:
            raise ValueError("inception score of no images")
        return float(np.mean(self.split_scores))


def inception_score(probs, split_size: int = IS_SPLIT_SIZE) -> float:
    acc = InceptionScoreAccumulator(split_size)
    acc.update(probs)
    return acc.result()


# ---- precision and recall ---------------------------------------------------------------------------------

def _squared_distances(rows, cols):
    rn = jnp.sum(rows * rows, axis=1)[:, None]
    cn = jnp.sum(cols * cols, axis=1)[None, :]
    cross = jnp.dot(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(rn - 2.0 * cross + cn, 0.0)


@functools.cache
def _compiled(k: int):

    def smallest(rows, cols, col_valid):
        d = jnp.where(col_valid[None, :], _squared_distances(rows, cols), jnp.inf)
        return -jax.lax.top_k(-d, min(k + 1, cols.shape[0]))[0]     # ascending, (R, k + 1)

    def inside(rows, row_radii, cols, col_radii):
        d = _squared_distances(rows, cols)
        return jnp.any(d <= col_radii[None, :], axis=1), jnp.any(d <= row_radii[:, None], axis=0)

    return jax.jit(smallest), jax.jit(inside)


def _blocks(features: np.ndarray, block: int):
    """Zero-padded (block, D) pieces of `features` and the number of real rows in each."""
    for start in range(0, len(features), block):
        piece = features[start:start + block]
        real = len(piece)
        if real < block:
            piece = np.concatenate([piece, np.zeros((block - real, features.shape[1]), features.dtype)])
        yield start, piece, real


def _block_size(n: int, multiple: int, block: int) -> int:
    return min(block, -(-n // multiple) * multiple) // multiple * multiple or multiple


def manifold_radii(features, k: int = NEAREST_K, *, mesh=None, block: int = DISTANCE_BLOCK) -> np.ndarray:
    """float32 (N,): squared distance of each feature to its k-th nearest neighbour in the set (self included
    at distance 0)."""

    features = np.asarray(features, np.float32)
    n = len(features)
    if n <= k:
        raise ValueError(f"k-nearest-neighbour radii with k={k} need more than {k} feature vectors, got {n}")
    rows_sharding, multiple = _sharding(mesh)
    bs = _block_size(n, multiple, block)
    smallest, _ = _compiled(k)
    radii = np.empty(n, np.float32)
    for r0, rows, r_real in _blocks(features, bs):
        rows_d = jax.device_put(rows, rows_sharding) if rows_sharding is not None else rows
        candidates = []
        for _, cols, c_real in _blocks(features, bs):
            candidates.append(np.asarray(smallest(rows_d, cols, np.arange(bs) < c_real)))
        candidates = np.concatenate(candidates, axis=1)[:r_real]
        radii[r0:r0 + r_real] = np.partition(candidates, k, axis=1)[:, k]
    return radii


def precision_recall(ref_features, sample_features, k: int = NEAREST_K, *, mesh=None,
                     block: int = DISTANCE_BLOCK) -> tuple[float, float]:
    """(precision, recall) of the samples against the references (see the module docstring)."""

    ref = np.asarray(ref_features, np.float32)
    smp = np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"features of different shapes: {ref.shape} vs {smp.shape}")
    ref_radii = manifold_radii(ref, k, mesh=mesh, block=block)
    smp_radii = manifold_radii(smp, k, mesh=mesh, block=block)
    rows_sharding, multiple = _sharding(mesh)
    bs = _block_size(max(len(ref), len(smp)), multiple, block)
    _, inside = _compiled(k)

    def padded_radii(radii, start, real):
        out = np.full(bs, -np.inf, np.float32)
        out[:real] = radii[start:start + real]
        return out

    ref_in = np.zeros(len(ref), bool)     # reference inside some sample ball -> recall
    smp_in = np.zeros(len(smp), bool)     # sample inside some reference ball -> precision
    for r0, rows, r_real in _blocks(ref, bs):
        rows_d = jax.device_put(rows, rows_sharding) if rows_sharding is not None else rows
        rr = padded_radii(ref_radii, r0, r_real)
        for c0, cols, c_real in _blocks(smp, bs):
            a, b = inside(rows_d, rr, cols, padded_radii(smp_radii, c0, c_real))
            ref_in[r0:r0 + r_real] |= np.asarray(a)[:r_real]
            smp_in[c0:c0 + c_real] |= np.asarray(b)[:c_real]
    return float(np.mean(smp_in)), float(np.mean(ref_in))


def _sharding(mesh):
    if mesh is None:
        return None, 1
    return batch_sharding(mesh, 2), data_parallel_size(mesh)


def num_splits(n: int, split_size: int = IS_SPLIT_SIZE) -> int:
    return max(1, math.ceil(n / split_size))
