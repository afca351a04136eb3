"""Feature sets of image collections, statistics files, and the metrics between two sets.

A `FeatureSet` is what the metrics need of one image collection: the count, the float64 mean and covariance
of the pool features (FID) and of the spatial features (sFID), the pool features themselves as float32 (kept for
precision and recall: the k-NN manifolds need every vector), and the Inception Score of the collection.

A statistics file (`save_stats`) is an .npz holding exactly that: `mu`, `sigma`, `mu_s`, `sigma_s`, `features`
(pool features, float32 (N, D)), `inception_score`, `num_images`, and which network made them (`feature_kind`,
`network_id`, `network_sha256`, the sha256 of the weights file for Inception). With it as the reference, every
metric is available (FID, sFID, precision, recall; IS is a property of the samples). A statistics file written
by another network (kind or weights sha256 differ) is refused: its numbers would not be comparable.
"""
from __future__ import annotations

import dataclasses
import zipfile

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from var_jax.eval import feature_metrics as fm
from var_jax.eval.digits_features import NETWORK_ID, digits_feature_net
from var_jax.eval.inception import compiled_features, load_inception
from var_jax.paths import atomic_write
from var_jax.sharding import batch_sharding, replicated

STATS_FORMAT = "var-jax-eval-stats"
STATS_VERSION = 1


class StatsFileError(ValueError):
    pass


@dataclasses.dataclass
class FeatureSet:
    num_images: int
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    features: np.ndarray | None
    inception_score: float | None = None
    is_splits: int | None = None
    image_shape: tuple | None = None   # (H, W, stored channels) of the images; None: a statistics file without it


@dataclasses.dataclass
class Network:
    """A feature extractor: `fn(uint8 (B, H, W, 3)) -> {'pool', 'spatial', 'probs'}` as numpy, with its identity."""
    kind: str            # 'inception' or 'digits'
    network_id: str
    sha256: str | None
    fn: object

    def __call__(self, batch):
        return self.fn(batch)


def inception_network(path, mesh, batch_size: int) -> Network:
    """The FID Inception from pytorch-fid's weights file, jitted, batches padded to `batch_size` and sharded
    over the mesh's data-parallel devices."""


    model, sha = load_inception(path)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated(mesh))
    step = compiled_features()
    in_sharding = batch_sharding(mesh, 4)

    def fn(batch):
        real = len(batch)
        if real < batch_size:   # pad the last batch so every batch compiles to one shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        out = step(graphdef, state, jax.device_put(batch, in_sharding))
        return {k: np.asarray(v)[:real] for k, v in out.items()}

    return Network("inception", "pytorch-fid-inception-2015-12-05", sha, fn)


def digits_network() -> Network:
    net = digits_feature_net()
    return Network("digits", NETWORK_ID, None, net.features)


def compute_feature_set(images, network: Network, batch_size: int, desc: str = "features",
                        split_size: int = fm.IS_SPLIT_SIZE, progress: bool = True) -> FeatureSet:
    """Run `network` over an image source (var_jax.eval.sources) batch by batch, accumulating statistics."""

    pool_stats, spatial_stats = fm.MomentAccumulator(), fm.MomentAccumulator()
    is_acc = fm.InceptionScoreAccumulator(split_size)
    features = None
    n = len(images)
    done = 0
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for batch in images.batches(batch_size):
            out = network(batch)
            if features is None:
                features = np.empty((n, out["pool"].shape[1]), np.float32)
            features[done:done + len(batch)] = out["pool"]
            pool_stats.update(out["pool"])
            spatial_stats.update(out["spatial"])
            is_acc.update(out["probs"])
            done += len(batch)
            bar.update(len(batch))
    if done < 2:
        raise ValueError(f"{images.name}: statistics need at least 2 images, got {done}")
    return FeatureSet(done, pool_stats.mean, pool_stats.cov, spatial_stats.mean, spatial_stats.cov, features,
                      is_acc.result(), len(is_acc.split_scores), image_shape_of(images))


def save_stats(path, fs: FeatureSet, network: Network):
    arrays = {"format": np.array(STATS_FORMAT), "version": np.array(STATS_VERSION),
              "feature_kind": np.array(network.kind), "network_id": np.array(network.network_id),
              "network_sha256": np.array(network.sha256 or ""), "num_images": np.array(fs.num_images),
              "mu": fs.mu, "sigma": fs.sigma, "mu_s": fs.mu_s, "sigma_s": fs.sigma_s,
              "inception_score": np.array(np.nan if fs.inception_score is None else fs.inception_score)}
    if fs.features is not None:
        arrays["features"] = fs.features
    if fs.image_shape is not None:
        arrays["image_shape"] = np.array(fs.image_shape)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def is_stats_file(path) -> bool:
    """An .npz without arr_0 but with mu and sigma (ours; ADM reference batches carry arr_0 and are read as
    images, since their mu/sigma come from the TensorFlow graph)."""
    try:
        with path.open("rb") as raw, zipfile.ZipFile(raw) as archive:
            names = set(archive.namelist())
    except Exception:
        return False
    return "arr_0.npy" not in names and {"mu.npy", "sigma.npy"} <= names


def load_stats(path, network: Network) -> FeatureSet:
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise StatsFileError(f"{path}: cannot read statistics: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if str(arrays.get("format", "")) != STATS_FORMAT:
        raise StatsFileError(f"{path}: not a statistics file written by `var-jax eval --save-stats`")
    kind, sha = str(arrays["feature_kind"]), str(arrays["network_sha256"])
    if kind != network.kind or str(arrays["network_id"]) != network.network_id:
        raise StatsFileError(f"{path}: statistics of {kind} features ({arrays['network_id']}), "
                             f"this run uses {network.kind} ({network.network_id})")
    if (network.sha256 or "") != sha:
        raise StatsFileError(f"{path}: statistics were computed with weights sha256 {sha[:12]}…, "
                             f"these weights are {(network.sha256 or '')[:12]}…")
    is_value = float(arrays["inception_score"])
    shape = tuple(int(v) for v in arrays["image_shape"]) if "image_shape" in arrays else None   # older files: none
    return FeatureSet(int(arrays["num_images"]), arrays["mu"], arrays["sigma"], arrays["mu_s"], arrays["sigma_s"],
                      arrays.get("features"), None if np.isnan(is_value) else is_value, image_shape=shape)


def compare(samples: FeatureSet, ref: FeatureSet, mesh=None) -> dict:
    """FID, sFID, IS (of the samples), precision and recall (None without reference features)."""
    out = {"fid": fm.frechet_distance(samples.mu, samples.sigma, ref.mu, ref.sigma),
           "sfid": fm.frechet_distance(samples.mu_s, samples.sigma_s, ref.mu_s, ref.sigma_s),
           "inception_score": samples.inception_score,
           "precision": None, "recall": None}
    if samples.features is not None and ref.features is not None:
        out["precision"], out["recall"] = fm.precision_recall(ref.features, samples.features, mesh=mesh)
    return out


# ---- what makes two sets comparable ------------------------------------------------------------------------

def image_shape_of(images) -> tuple[int, int, int]:
    """(H, W, channels as stored: 1 grey, 3 colour) of an image source (var_jax.eval.sources)."""
    return tuple(images.image_shape[:2]) + (int(images.stored_channels),)


def describe_image_shape(shape) -> str:
    height, width, channels = shape
    return f"{width}×{height} {'grey' if channels == 1 else 'RGB'}"


def image_mismatch(samples_shape, ref_shape) -> str | None:
    """Why two image sets should not be compared, or None. Both are resized to the network's input either way,
    so a FID between sizes or between grey and colour images runs, but it measures the resizing and the colour
    conversion rather than the samples."""
    if samples_shape is None or ref_shape is None or tuple(samples_shape) == tuple(ref_shape):
        return None
    return (f"the samples are {describe_image_shape(samples_shape)} images but the references are "
            f"{describe_image_shape(ref_shape)}: FID compares sets of one image size and colour kind; resize or "
            "convert one set to the other's first")


def too_few_images(samples: FeatureSet, ref: FeatureSet) -> str | None:
    """A warning when either set has no more images than the feature dimensions: the covariances are then
    singular, so FID and sFID say little, and with so few points the k-NN balls of precision and recall cover
    everything (the ADM protocol scores 50,000 samples against its reference batch)."""
    dims = {"FID": len(samples.mu), "sFID": len(samples.mu_s)}
    fewest = min(samples.num_images, ref.num_images)
    short = {name: dim for name, dim in dims.items() if fewest <= dim}
    if not short:
        return None
    return (f"{samples.num_images} samples and {ref.num_images} references are too few: no more images than "
            "feature dimensions (" + ", ".join(f"{name} {dim}" for name, dim in short.items()) + ") give singular "
            "covariances, so these FID, sFID, precision and recall are not meaningful (the ADM protocol scores "
            "50,000 samples)")
