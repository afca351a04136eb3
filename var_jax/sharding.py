"""The one table that maps logical axis names to mesh axes, and the shardings it gives.

Every parameter names its logical axes when it is created (`nnx.Param(..., sharding_names=('embed', 'mlp'))`)
and activations are constrained with `constrain(x, ('batch', 'seq', 'embed'))`. Changing the parallelism is
changing the table or the mesh shape (var_jax/mesh.py), nothing else. The table is `LOGICAL_AXIS_RULES`, with a
run's `config.sharding_rules` applied over it (`set_logical_axis_rules`, called when the trainer builds its mesh).

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded),
`tensor` (model parallel over heads / MLP hidden / vocabulary).

Parameters (`state_shardings`): each dimension takes its logical axis's mesh axes where they divide it. A mesh
axis that does not divide its preferred dimension goes to the largest other dimension it divides (big_vision's
FSDP rule), so a weight stays whole along a mesh axis only when none of its dimensions can be split by it; those
weights, and what they cost per device, are said once (process 0). The optimizer state and checkpoint restores use
the same shardings (train/state.py abstract_train_state). Activations (`constrain`) keep the plain rule: a
dimension that the mesh axes do not divide is replicated.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The mesh itself lives in var_jax/mesh.py; these names are imported from here throughout.
from var_jax.mesh import MESH_AXES, make_mesh, mesh_shape  # noqa: F401

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

# Adam keeps two float32 moments beside every float32 parameter.
ADAM_COPIES = 3
# weights named in the replication line; the rest are counted
NAMED_IN_REPORT = 4

Table = dict[str, tuple[str, ...]]


def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def rules_table(overrides=()) -> Table:
    """LOGICAL_AXIS_RULES with `overrides` applied: a dict, or (logical axis, mesh axes) pairs as a config holds
    them (`config.sharding_rules = (('embed', ('fsdp', 'tensor')), ('mlp', None))`); None or () = replicated.
    Unknown logical names and mesh axes are errors naming them."""
    table = {name: _mesh_axes(rule) for name, rule in LOGICAL_AXIS_RULES.items()}
    items = overrides.items() if hasattr(overrides, "items") else overrides
    for item in items or ():
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"each rule is a (logical axis, mesh axes) pair, got {item!r}")
        logical, rule = item
        if logical not in table:
            raise ValueError(f"unknown logical axis {logical!r} (known: {', '.join(sorted(table))})")
        if not (rule is None or isinstance(rule, str) or
                (isinstance(rule, (tuple, list)) and all(isinstance(a, str) for a in rule))):
            raise ValueError(f"{logical!r} -> {rule!r}: mesh axes must be a name, a tuple of names or None")
        axes = _mesh_axes(rule)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"{logical!r} -> {rule!r}: unknown mesh axis {unknown[0]!r} "
                             f"(mesh axes: {', '.join(MESH_AXES)})")
        if len(set(axes)) != len(axes):
            raise ValueError(f"{logical!r} -> {rule!r}: a mesh axis may appear only once")
        table[logical] = axes
    return table


_active_rules: Table = rules_table()
_reported: set[str] = set()     # replication lines already printed under the current table


def set_logical_axis_rules(overrides=()) -> Table:
    """Make LOGICAL_AXIS_RULES + `overrides` the table of this process. Every run sets it from its config, and
    then says once more which weights stay whole."""
    global _active_rules
    _active_rules = rules_table(overrides)
    _reported.clear()
    return _active_rules


def _rule(table: Table, name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in table:
        raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
    return table[name]


def _entry(axes: Sequence[str]):
    """A PartitionSpec entry: None, one mesh axis, or a tuple of them."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _preferred(logical, shape, mesh, table: Table) -> tuple[list[list[str]], list[str]]:
    """Each dimension's mesh axes from the table (all of them where they divide it, else none; an axis taken by
    an earlier dimension is skipped) and the mesh axes of size > 1 that found no place."""
    dims, dropped, used = [], [], set()
    for i, name in enumerate(logical):
        axes = [a for a in _rule(table, name) if a not in used]
        if shape is not None and mesh is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
            dropped += [a for a in axes if mesh.shape[a] > 1]
            axes = []
        used.update(axes)
        dims.append(axes)
    return dims, [a for a in dropped if a not in used]


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Table | None = None) -> P:
    """PartitionSpec for logical axis names. With `shape` and `mesh`, a dimension that its mesh axes do not
    divide evenly is replicated instead (small test models, odd class counts)."""
    if logical is None:
        return P()
    dims, _ = _preferred(logical, shape, mesh, rules or _active_rules)
    return P(*map(_entry, dims))


def param_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
               rules: Table | None = None) -> tuple[P, tuple[str, ...]]:
    """(PartitionSpec, mesh axes left out) for a parameter: the preferred placement, then every mesh axis that did
    not divide its preferred dimension moves to the dimension with the largest per-device extent that it divides.
    The axes left out are those no dimension could take: the parameter is whole along them."""
    if logical is None:
        return P(), ()
    dims, dropped = _preferred(logical, shape, mesh, rules or _active_rules)
    left_out = []
    for axis in dropped:
        splits = [math.prod(mesh.shape[a] for a in d) for d in dims]
        fits = [i for i in range(len(shape)) if shape[i] % (splits[i] * mesh.shape[axis]) == 0]
        if not fits:
            left_out.append(axis)
            continue
        dims[max(fits, key=lambda i: shape[i] // splits[i])].append(axis)
    return P(*map(_entry, dims)), tuple(left_out)


class Placement(NamedTuple):
    """Where one parameter lives: its spec, the mesh axes it stays whole along, and what that costs."""
    name: str                    # its path in the state, e.g. blocks/attn/mat_qkv/kernel
    spec: P
    left_out: tuple[str, ...]    # mesh axes (size > 1) that divide none of its dimensions
    shape: tuple[int, ...]
    itemsize: int


def _placement(path, x, mesh: Mesh, rules: Table | None) -> Placement:
    value = x.get_value() if isinstance(x, nnx.Variable) else x
    names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
    shape = tuple(np.shape(value))
    if names is not None and len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not fit a parameter of shape {shape}")
    spec, left_out = param_spec(names, shape, mesh, rules)
    dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
    return Placement(jax.tree_util.keystr(path, simple=True, separator="/"), spec, left_out, shape,
                     np.dtype(dtype).itemsize)


def state_shardings(state, mesh: Mesh, rules: Table | None = None, report: bool = True):
    """NamedSharding for every leaf of an nnx.State (or any pytree of Variables / arrays); with `report`, the
    weights left whole along a mesh axis are said once per process (process 0)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    placements = [_placement(path, x, mesh, rules) for path, x in leaves]
    message = replication_message(placements, mesh) if report else None
    if message and message not in _reported and jax.process_index() == 0:
        _reported.add(message)
        print(message, flush=True)
    return treedef.unflatten([NamedSharding(mesh, p.spec) for p in placements])


def _bytes_per_device(p: Placement, mesh: Mesh) -> int:
    split = math.prod(mesh.shape[a] for entry in p.spec if entry is not None for a in _mesh_axes(entry))
    return math.prod(p.shape) * p.itemsize // split


def replication_message(placements: Sequence[Placement], mesh: Mesh) -> str | None:
    """One line naming the weights that stay whole along a mesh axis and their memory per device, or None."""
    whole = sorted((p for p in placements if p.left_out), key=lambda p: -_bytes_per_device(p, mesh))
    if not whole:
        return None
    total = sum(_bytes_per_device(p, mesh) for p in whole)
    named = ", ".join(f"{p.name} {p.shape} ({'+'.join(f'{a}={mesh.shape[a]}' for a in p.left_out)})"
                      for p in whole[:NAMED_IN_REPORT])
    more = f" and {len(whole) - NAMED_IN_REPORT} more" if len(whole) > NAMED_IN_REPORT else ""
    return (f"[sharding] {len(whole)} weights stay whole along a mesh axis that divides none of their dimensions: "
            f"{named}{more}; per device they take {_size(total)}, {_size(ADAM_COPIES * total)} with the two Adam "
            "moments (float32)")


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes / 2 ** 10:.3g} KiB"


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over every data-parallel device, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """The number of batch shards: the product of the mesh axes of the `batch` rule."""
    return math.prod(mesh.shape[a] for a in _active_rules["batch"])


def constrain(x, logical: Sequence[str | None]):
    """Sharding constraint on an activation, by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh))
