"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter names its logical axes when it is created (`nnx.Param(..., sharding_names=('embed', 'mlp'))`)
and activations are constrained with `constrain(x, ('batch', 'seq', 'embed'))`. Changing the parallelism is
changing `LOGICAL_AXIS_RULES` or the mesh shape, nothing else.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded),
`tensor` (model parallel over heads / MLP hidden / vocabulary).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),   # activations: the batch is split over every data-parallel device
    "embed": "fsdp",             # model width: parameters sharded ZeRO-3 style
    "mlp": "tensor",             # MLP hidden (4C)
    "qkv": "tensor",             # fused q|k|v projection output (3C)
    "heads": "tensor",           # attention heads
    "ada": "tensor",             # AdaLN modulation output (6C / 2C)
    "vocab": "tensor",           # codebook size V of the output head
    "layers": None,              # the stacked-blocks axis of scanned layers
    "seq": None,
    "classes": None,
    "cvae": None,                # tokenizer latent channels
    "conv_in": None,             # tokenizer conv kernels are small; replicated
    "conv_out": None,
    "kernel": None,
    "norm": None,
}


def mesh_shape(requested: Sequence[int], num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolve a (data, fsdp, tensor) request with at most one -1 against the device count."""
    num_devices = num_devices or jax.device_count()
    requested = tuple(int(s) for s in requested)
    if len(requested) != 3:
        raise ValueError(f"mesh must have 3 sizes (data, fsdp, tensor), got {requested}")
    if requested.count(-1) > 1 or any(s == 0 or s < -1 for s in requested):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {requested}")
    known = math.prod(s for s in requested if s != -1)
    if -1 in requested:
        if num_devices % known:
            raise ValueError(f"mesh {requested}: {num_devices} devices are not divisible by {known}")
        requested = tuple(num_devices // known if s == -1 else s for s in requested)
    if math.prod(requested) != num_devices:
        raise ValueError(f"mesh {requested} needs {math.prod(requested)} devices, but {num_devices} are present")
    return requested


def make_mesh(requested: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(requested, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axis names. With `shape` and `mesh`, a dimension that the mesh axes do not
    divide evenly is replicated instead (small test models, odd class counts)."""
    if logical is None:
        return P()
    out = []
    for i, name in enumerate(logical):
        axes = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        if axes is not None and shape is not None and mesh is not None:
            names = (axes,) if isinstance(axes, str) else axes
            size = math.prod(mesh.shape[a] for a in names)
            if shape[i] % size:
                axes = None
        out.append(axes)
    return P(*out)


def _logical_names(x):
    if isinstance(x, nnx.Variable):
        return x.get_metadata().get("out_sharding")
    return None


def state_shardings(state, mesh: Mesh):
    """NamedSharding for every leaf of an nnx.State (or any pytree of Variables / arrays)."""
    def one(x):
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        names = _logical_names(x)
        shape = np.shape(value)
        if names is not None and len(names) != len(shape):
            raise ValueError(f"logical axes {names} do not fit a parameter of shape {shape}")
        return NamedSharding(mesh, logical_to_spec(names, shape, mesh))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over every data-parallel device, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def constrain(x, logical: Sequence[str | None]):
    """Sharding constraint on an activation, by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))
