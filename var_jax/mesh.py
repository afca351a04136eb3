"""The device mesh: the named axes (data, fsdp, tensor) laid over every device, within and across TPU slices.

One slice (`mesh_dcn` (1, 1, 1), the default): `mesh` lays the axes over all devices with `jax.make_mesh`, which
orders them along the chips' interconnect (ICI).

Several slices (a multi-slice TPU job: slices joined by the data-centre network, DCN, far slower than ICI): `mesh`
is the layout within each slice and `mesh_dcn` how many slices each axis spans; the full mesh is their product,
built by `jax.experimental.mesh_utils.create_hybrid_device_mesh`, so each slice is one contiguous block of the
device grid along `data`. Only `data` may span slices: its one gradient all-reduce per step is the only traffic
that tolerates DCN (FSDP gathers every weight in every step, tensor parallelism talks in every layer).

Sizes follow one rule for both settings: three sizes (data, fsdp, tensor), at most one -1 for "the rest" (of a
slice's devices for `mesh`, of the slices for `mesh_dcn`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
DCN_AXES = ("data",)        # the mesh axes that may span slices
ONE_SLICE = (1, 1, 1)


def mesh_shape(requested: Sequence[int], num_devices: int | None = None, *, name: str = "mesh",
               unit: str = "devices") -> tuple[int, int, int]:
    """Resolve a (data, fsdp, tensor) request with at most one -1 against `num_devices` (of `unit`)."""
    num_devices = num_devices or jax.device_count()
    requested = tuple(int(s) for s in requested)
    if len(requested) != 3:
        raise ValueError(f"{name} must have 3 sizes (data, fsdp, tensor), got {requested}")
    if requested.count(-1) > 1 or any(s == 0 or s < -1 for s in requested):
        raise ValueError(f"{name} sizes must be positive with at most one -1, got {requested}")
    known = math.prod(s for s in requested if s != -1)
    if -1 in requested:
        if num_devices % known:
            raise ValueError(f"{name} {requested}: {num_devices} {unit} are not divisible by {known}")
        requested = tuple(num_devices // known if s == -1 else s for s in requested)
    if math.prod(requested) != num_devices:
        raise ValueError(f"{name} {requested} needs {math.prod(requested)} {unit}, but {num_devices} are present")
    return requested


def slice_count(devices) -> int:
    """Number of TPU slices the devices belong to; devices without a `slice_index` (CPU, GPU) form one."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def dcn_mesh_shape(requested: Sequence[int] = ONE_SLICE, devices=None) -> tuple[int, int, int]:
    """`mesh_dcn` resolved against the devices' slices; only the DCN_AXES may span more than one slice."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(requested, slice_count(devices), name="mesh_dcn", unit="slices")
    across = [f"{axis}={size}" for axis, size in zip(MESH_AXES, shape) if size > 1 and axis not in DCN_AXES]
    if across:
        raise ValueError(f"mesh_dcn {shape} puts {', '.join(across)} across slices: only data parallelism may span "
                         "the data-centre network; shard fsdp and tensor within a slice (in `mesh`)")
    return shape


def hybrid_device_grid(per_slice: Sequence[int], dcn: Sequence[int], devices) -> np.ndarray:
    """The device array of shape per_slice × dcn (elementwise): each slice's devices laid out as `per_slice`
    (along its interconnect, on TPU), the slices stacked along the axes `dcn` splits."""
    return mesh_utils.create_hybrid_device_mesh(tuple(per_slice), tuple(dcn), devices)


def make_mesh(requested: Sequence[int] = (-1, 1, 1), devices=None, dcn: Sequence[int] = ONE_SLICE) -> Mesh:
    """The (data, fsdp, tensor) mesh: `requested` within each slice, `dcn` across slices (see the module doc)."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = dcn_mesh_shape(dcn, devices)
    per_slice = mesh_shape(requested, len(devices) // math.prod(dcn),
                           unit="devices" if dcn == ONE_SLICE else "devices per slice")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if dcn == ONE_SLICE:
        return jax.make_mesh(per_slice, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_grid(per_slice, dcn, devices), MESH_AXES, axis_types=axis_types)
