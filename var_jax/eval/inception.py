"""The FID Inception-v3 in Flax NNX (NHWC), with weights converted from pytorch-fid's state dict file.

This is the network of the 2015-12-05 TensorFlow Inception graph that the ADM evaluator (and TTUR's FID) runs,
in the form pytorch-fid ported it to PyTorch (`pt_inception-2015-12-05-6726825d.pth`). It differs from
torchvision's ImageNet Inception-v3 in the places pytorch-fid's `FIDInceptionA/C/E_1/E_2` patch:
  * the average pools of the A, C and E_1 blocks' pool branch leave the padding out of the mean
    (count_include_pad=False, as TensorFlow's avg_pool does);
  * the last block (Mixed_7c, E_2) takes a 3×3 *max* pool in its pool branch;
  * the classifier has 1,008 outputs (fc 2048 -> 1008);
  * BatchNorm eps = 0.001.
Input handling follows pytorch-fid: uint8 images / 255, resized to 299×299 bilinearly with align_corners=False
(PyTorch's `F.interpolate`, no antialiasing), then scaled to [-1, 1] by 2x - 1.
Known differences from the TensorFlow graph the ADM evaluator runs (and so from its published numbers, by a
small amount): TF1's ResizeBilinear does not use half-pixel centres, and the graph scales by (x - 128) / 128.

Outputs per image (`InceptionV3.features`):
  pool     float32 (2048,)   the pool3 features (global average of Mixed_7c): FID, precision, recall;
  spatial  float32 (2023,)   the first 7 channels of the TF graph's `mixed_6/conv` (17×17), flattened in HWC
                             order: sFID. The TF graph's blocks `mixed, mixed_1, …, mixed_10` are pytorch-fid's
                             Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c, so `mixed_6` is Mixed_6d, and its
                             `conv` (the block's first convolution, BN and ReLU included) is `Mixed_6d.branch1x1`
                             (192 channels; they are also the first 192 channels of Mixed_6d's output);
  probs    float32 (1008,)   softmax(pool @ fc.weight.T), *without* the fc bias, as the ADM evaluator's
                             Inception Score takes it.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import linen

from var_jax.checkpoints import read_state_dict
from var_jax.paths import user_path

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST


class InceptionWeightsError(ValueError):
    """A weights file that is not pytorch-fid's FID Inception state dict (wrong keys or shapes)."""


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Convolution without bias, BatchNorm (running statistics), ReLU; torch padding semantics."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                             use_bias=False, precision=HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x):
    return linen.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int = 0):
    return linen.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3_same(x))], axis=-1)


class InceptionB(nnx.Module):   # Mixed_6a: 35×35 -> 17×17
    def __init__(self, cin: int, *, rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, *, rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        """(the block's output, its branch1x1 output: the TF graph's `mixed_N/conv`)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return jnp.concatenate([b1, b7, bd, self.branch_pool(_avg_pool_3x3_same(x))], axis=-1), b1


class InceptionD(nnx.Module):   # Mixed_7a: 17×17 -> 8×8
    def __init__(self, cin: int, *, rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    def __init__(self, cin: int, *, max_pool: bool, rngs):
        self.max_pool = max_pool     # E_2 (Mixed_7c): max pool in the pool branch; E_1: average without padding
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _max_pool_3x3(x, 1, pad=1) if self.max_pool else _avg_pool_3x3_same(x)
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """Attribute names follow the pytorch-fid state dict, so conversion is a renaming of leaves."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
        self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, precision=HIGHEST, rngs=rngs)

    def __call__(self, x):
        """x: float32 (N, 299, 299, 3) in [-1, 1] -> (pool (N, 2048), mixed_6/conv (N, 17, 17, 192))."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3(x, 2)
        x = _max_pool_3x3(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)
        x, _ = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return jnp.mean(x, axis=(1, 2)), mixed_6_conv

    def features(self, images):
        """uint8 (N, H, W, 3), any H and W -> {'pool', 'spatial', 'probs'} (see the module docstring)."""
        x = images.astype(jnp.float32) / 255.0
        x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
        pool, mixed_6_conv = self(2.0 * x - 1.0)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(len(pool), -1)
        logits = jnp.dot(pool, self.fc.kernel[...], precision=HIGHEST)    # no bias: the ADM evaluator's IS
        return {"pool": pool, "spatial": spatial, "probs": jax.nn.softmax(logits, axis=-1)}


def interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """float32 (size_out, size_in): PyTorch's bilinear resampling along one axis (align_corners=False, no
    antialias): source = (i + 0.5)·in/out − 0.5 clamped at 0, blending the two nearest pixels (edge clamped).
    The source positions are computed in float32, as PyTorch's CPU kernel does (float64 positions differ from
    it by up to 2e-5 on [0, 1] images)."""
    f32 = np.float32
    scale = f32(size_in / size_out)
    src = np.maximum((np.arange(size_out, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = (src - lo.astype(f32)).astype(f32)
    m = np.zeros((size_out, size_in), f32)
    np.add.at(m, (np.arange(size_out), lo), f32(1.0) - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m


def resize_bilinear(x, height: int, width: int):
    """NHWC float -> (N, height, width, C), `F.interpolate(mode='bilinear', align_corners=False)` semantics."""
    if x.shape[1:3] == (height, width):
        return x
    rh = jnp.asarray(interpolation_matrix(x.shape[1], height))
    rw = jnp.asarray(interpolation_matrix(x.shape[2], width))
    x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=HIGHEST)
    return jnp.einsum("pw,nowc->nopc", rw, x, precision=HIGHEST)


# ---- weights ---------------------------------------------------------------------------------------------

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def abstract_model() -> InceptionV3:
    return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))


def _torch_key(path: tuple) -> str:
    """The pytorch-fid key of an NNX leaf path, e.g. ('Mixed_5b', 'branch1x1', 'conv', 'kernel') ->
    'Mixed_5b.branch1x1.conv.weight'."""
    *modules, leaf = [str(p) for p in path]
    if modules[-1] == "bn":
        leaf = {v: k for k, v in _BN_NAMES.items()}[leaf]
    else:   # conv or fc
        leaf = "weight" if leaf == "kernel" else leaf
    return ".".join(modules + [leaf])


def _to_nnx_layout(path: tuple, array: np.ndarray) -> np.ndarray:
    if str(path[-1]) == "kernel":
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T   # OIHW -> HWIO; (out, in) -> (in, out)
    return array


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid key -> torch shape, for every tensor the FID Inception needs (num_batches_tracked aside)."""
    return dict(_expected_shapes())


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, leaf in nnx.to_flat_state(nnx.state(abstract_model())):
        shape = tuple(leaf.get_value().shape)
        if str(path[-1]) == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        shapes[_torch_key(path)] = shape
    return shapes


def from_state_dict(state_dict: dict, source: str = "state dict") -> InceptionV3:
    """An InceptionV3 from pytorch-fid's state dict (name -> numpy array); InceptionWeightsError naming the first
    problems when keys or shapes do not match."""
    graphdef, abstract = nnx.split(abstract_model())
    flat = nnx.to_flat_state(abstract)
    wanted = {_torch_key(path): path for path, _ in flat}
    given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(wanted) - set(given))
    unexpected = sorted(set(given) - set(wanted))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]!r})")
        raise InceptionWeightsError(f"{source} is not pytorch-fid's FID Inception state dict: " + ", ".join(parts))
    values = []
    for path, leaf in flat:
        key = _torch_key(path)
        array = np.asarray(given[key])
        converted = _to_nnx_layout(path, array)
        want = tuple(leaf.get_value().shape)
        if converted.shape != want:
            raise InceptionWeightsError(f"{source}: {key} has shape {tuple(array.shape)}, the FID Inception needs "
                                        f"{expected_state_dict_shapes()[key]}")
        values.append((path, jnp.asarray(converted, jnp.float32)))
    state = nnx.from_flat_state([(path, leaf.replace(value)) for (path, leaf), (_, value) in zip(flat, values)])
    return nnx.merge(graphdef, state)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with user_path(path).open("rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception(path) -> tuple[InceptionV3, str]:
    """(model, sha256 of the file) from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or an .npz of the
    same keys). CheckpointError for an unreadable file, InceptionWeightsError for a mismatched one."""
    state_dict = read_state_dict(path)
    return from_state_dict(state_dict, source=str(path)), file_sha256(path)


def _features(graphdef, state, images):
    return nnx.merge(graphdef, state).features(images)


@functools.cache
def compiled_features():
    """`InceptionV3.features` as a pure function of (graphdef, state, images), jitted once per process."""
    return jax.jit(_features, static_argnums=0)
