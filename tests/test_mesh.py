"""Multi-slice meshes (var_jax/mesh.py) and where parameters live (var_jax/sharding.py).

Multi-slice device grids are checked on fake TPU devices (JAX's CPU devices carry no `slice_index`, and their
attributes cannot be set); a train step on a mesh arranged this way over 8 CPU devices is in
tests/test_sharded_step.py. Shardings of the released d30 are computed on abstract meshes (shapes only, no
memory)."""
import dataclasses
import itertools
import math
import random

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec as P

from var_jax.mesh import MESH_AXES, dcn_mesh_shape, hybrid_device_grid, mesh_shape
from var_jax.sharding import LOGICAL_AXIS_RULES, param_spec, rules_table, set_logical_axis_rules, state_shardings


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """What create_hybrid_device_mesh reads of a TPU device (coords are per slice, as on a real multi-slice)."""
    id: int
    slice_index: int
    process_index: int
    coords: tuple
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"


def fake_pod(num_slices: int, chips=(2, 2, 2), chips_per_host: int = 4) -> list:
    devices = []
    for s in range(num_slices):
        for i, (z, y, x) in enumerate(itertools.product(*(range(n) for n in chips[::-1]))):
            devices.append(FakeTpu(id=len(devices), slice_index=s, process_index=len(devices) // chips_per_host,
                                   coords=(x, y, z)))
    return devices


@dataclasses.dataclass(frozen=True)
class SlicedCpu:
    """A real CPU device with a slice index assigned (CPU devices have none)."""
    device: object
    slice_index: int

    def __getattr__(self, name):
        return getattr(self.device, name)


def sliced_cpu_mesh(per_slice, dcn, slice_of) -> Mesh:
    """A real Mesh over jax.devices(), arranged as multi-slice TPUs would be with slice_index = slice_of(device)."""
    grid = hybrid_device_grid(per_slice, dcn, [SlicedCpu(d, slice_of(d)) for d in jax.devices()])
    return Mesh(np.vectorize(lambda d: d.device, otypes=[object])(grid), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


@pytest.mark.parametrize("num_slices,per_slice", [(2, (2, 2, 2)), (4, (1, 8, 1)), (2, (2, 4, 1))])
def test_slices_are_contiguous_blocks_along_data(num_slices, per_slice):
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    devices = fake_pod(num_slices)
    rng.shuffle(devices)                          # the grid must not depend on the order devices are listed in
    labels = list(range(num_slices))
    rng.shuffle(labels)                           # nor on slice indices following device ids
    devices = [dataclasses.replace(d, slice_index=labels[d.slice_index]) for d in devices]
    dcn = dcn_mesh_shape((-1, 1, 1), devices)
    assert dcn == (num_slices, 1, 1)
    grid = hybrid_device_grid(per_slice, dcn, devices)
    assert grid.shape == (per_slice[0] * num_slices, per_slice[1], per_slice[2])
    assert sorted(d.id for d in grid.flat) == sorted(d.id for d in devices)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    for block in range(num_slices):
        rows = slices[block * per_slice[0]:(block + 1) * per_slice[0]]
        assert len(np.unique(rows)) == 1, (seed, slices)      # one slice per block of `data` rows ...
    assert len(np.unique(slices[:, 0, 0])) * per_slice[0] == grid.shape[0]   # ... a different one in each block
    if per_slice == (2, 2, 2):       # within a slice, mesh neighbours are interconnect neighbours
        for axis in range(3):
            a, b = grid[0, 0, 0], grid[tuple(1 if k == axis else 0 for k in range(3))]
            assert sum(x != y for x, y in zip(a.coords, b.coords)) == 1, (seed, axis, a, b)


@pytest.mark.parametrize("dcn,devices,message", [
    ((1, 2, 1), 2, r"mesh_dcn \(1, 2, 1\) puts fsdp=2 across slices"),
    ((2, 1, 2), 4, r"puts tensor=2 across slices"),
    ((1, 1, 1), 2, r"mesh_dcn \(1, 1, 1\) needs 1 slices, but 2 are present"),
    ((4, 1, 1), 2, r"needs 4 slices, but 2 are present"),
    ((-1, 1, 1, 1), 2, r"mesh_dcn must have 3 sizes"),
])
def test_dcn_shape_refusals(dcn, devices, message):
    with pytest.raises(ValueError, match=message):
        dcn_mesh_shape(dcn, fake_pod(devices))


def test_dcn_on_devices_without_slices():
    assert dcn_mesh_shape((-1, 1, 1)) == (1, 1, 1)      # CPU devices: one slice
    with pytest.raises(ValueError, match=r"needs 2 slices, but 1 are present"):
        dcn_mesh_shape((2, 1, 1))


def _config(**fields):
    config = ml_collections.ConfigDict(dict(mesh=(-1, 1, 1), mesh_dcn=(1, 1, 1), sharding_rules=()))
    config.update(fields)
    return config


@pytest.mark.parametrize("fields,message", [
    (dict(mesh_dcn=(2, 1, 1)), r"^mesh_dcn: mesh_dcn \(2, 1, 1\) needs 2 slices"),
    (dict(mesh_dcn=(1, -1, 2)), r"^mesh_dcn: mesh_dcn \(1, -1, 2\): 1 slices are not divisible by 2"),
    (dict(sharding_rules=(("embd", "fsdp"),)), r"^sharding_rules: unknown logical axis 'embd' \(known: ada, batch"),
    (dict(sharding_rules=(("embed", "fdsp"),)), r"^sharding_rules: 'embed' -> 'fdsp': unknown mesh axis 'fdsp'"),
    (dict(sharding_rules=(("embed", ("fsdp", "fsdp")),)), r"^sharding_rules: .*appear only once"),
    (dict(sharding_rules=("embed",)), r"^sharding_rules: each rule is a \(logical axis, mesh axes\) pair"),
    (dict(mesh=(3, 1, 1)), r"^mesh: mesh \(3, 1, 1\) needs 3 devices"),
])
def test_bad_mesh_settings_are_named(fields, message):
    from var_jax.train.stage import ConfigError
    from var_jax.train.trainer import build_mesh
    with pytest.raises(ConfigError, match=message):
        build_mesh(_config(**fields))
    build_mesh(_config())                                # leaves the default table in force


def test_sharding_rules_override_from_a_config():
    table = rules_table((("embed", ("fsdp", "tensor")), ("mlp", None)))
    assert table["embed"] == ("fsdp", "tensor") and table["mlp"] == () and table["qkv"] == ("tensor",)
    assert rules_table(ml_collections.ConfigDict({"vocab": "fsdp"}))["vocab"] == ("fsdp",)
    mesh = AbstractMesh((1, 2, 4), MESH_AXES)
    assert param_spec(("embed", "mlp"), (64, 256), mesh, table)[0] == P(("fsdp", "tensor"), None)


def test_an_axis_that_does_not_divide_moves_to_the_largest_dimension_it_divides():
    mesh = AbstractMesh((1, 4, 2), MESH_AXES)
    # fsdp does not divide embed (6): of the dimensions it divides, 128 keeps the most per device
    assert param_spec(("embed", None, None), (6, 64, 128), mesh) == (P(None, None, "fsdp"), ())
    # per device, not in total: mlp's 256 is already split by tensor (128 each) while 160 is whole
    assert param_spec(("embed", "mlp", None), (6, 256, 160), mesh) == (P(None, "tensor", "fsdp"), ())
    assert param_spec(("embed", "mlp"), (6, 256), mesh) == (P(None, ("tensor", "fsdp")), ())
    assert param_spec(("embed", "mlp"), (6, 10), mesh) == (P(None, "tensor"), ("fsdp",))


def old_rule_spec(logical, shape, mesh):
    """The rule before the fallback (independent reference): a dimension its axes do not divide is replicated."""
    out = []
    for name, size in zip(logical, shape):
        axes = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        names = (axes,) if isinstance(axes, str) else axes or ()
        out.append(axes if axes is not None and size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*out)


def _axes(entry):
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def wanted_axes(logical, mesh) -> set:
    """The mesh axes of size > 1 that the default table asks for."""
    return {a for n in logical if n is not None for a in _axes(LOGICAL_AXIS_RULES[n]) if mesh.shape[a] > 1}


def test_fallback_rule_on_random_shapes():
    """Random shapes and meshes: specs are valid, equal the old rule wherever it placed every axis, and leave an
    axis out only when no dimension can take it."""
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    names = [n for n in LOGICAL_AXIS_RULES if n != "batch"]
    checked = 0
    while checked < 500:
        mesh = AbstractMesh(tuple(rng.choice([1, 2, 3, 4, 8]) for _ in MESH_AXES), MESH_AXES)
        logical = tuple(rng.choice(names + [None]) for _ in range(rng.randint(1, 4)))
        rules = [LOGICAL_AXIS_RULES[n] for n in logical if n is not None and LOGICAL_AXIS_RULES[n]]
        if len(set(rules)) < len(rules):
            continue                          # two dimensions asking for one mesh axis: no weight does that
        shape = tuple(rng.choice([1, 3, 6, 10, 12, 16, 30, 64, 96]) for _ in logical)
        spec, left_out = param_spec(logical, shape, mesh)
        where = f"seed {seed}: {logical} {shape} {dict(mesh.shape)} -> {spec}, left out {left_out}"
        placed = [a for entry in spec for a in _axes(entry)]
        assert len(placed) == len(set(placed)), where
        splits = [math.prod(mesh.shape[a] for a in _axes(e)) for e in spec]
        assert all(size % s == 0 for size, s in zip(shape, splits)), where
        old = old_rule_spec(logical, shape, mesh)
        if wanted_axes(logical, mesh) <= {a for e in old for a in _axes(e)}:
            assert spec == old, where
        assert set(left_out) == wanted_axes(logical, mesh) - set(placed), where
        for axis in left_out:
            assert all(size % (s * mesh.shape[axis]) for size, s in zip(shape, splits)), where
        checked += 1


@pytest.fixture(scope="module")
def d30_params():
    """The released d30's parameters as abstract arrays (nothing allocated), by path."""
    from var_jax.checkpoints import model_parts
    from var_jax.transformer import VAR, preset
    return model_parts(lambda rngs: VAR(preset(30), rngs=rngs)).param_vars


def by_path(tree) -> dict:
    from flax import nnx
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def test_d30_on_512_devices(d30_params, capsys):
    """FSDP over 512 devices: every d30 weight with a dimension divisible by 512 is split 512 ways, the one line
    names the rest with their memory; the imagenet config's fsdp=128 splits every weight over 1 MiB."""
    from conftest import repo_config
    set_logical_axis_rules()                              # a new run: its line is said again
    mesh = AbstractMesh((1, 512, 1), MESH_AXES)
    shardings = by_path(state_shardings(d30_params, mesh))
    whole_bytes = 0
    for key, var in by_path(d30_params).items():
        shape, names = var.get_value().shape, var.get_metadata()["out_sharding"]
        per_device = math.prod(shardings[key].shard_shape(shape))
        if any(n % 512 == 0 for n in shape) and "embed" in names:
            assert per_device * 512 == math.prod(shape), (key, shape, shardings[key].spec)
        elif "embed" in names:                            # the table asks for fsdp, no dimension can take it
            assert per_device == math.prod(shape), key
            whole_bytes += 4 * per_device
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and f"{3 * whole_bytes / 2 ** 30:.3g} GiB with the two Adam moments" in line, line
    assert "blocks/attn/mat_qkv/kernel (30, 1920, 5760) (fsdp=512)" in line
    state_shardings(d30_params, mesh)
    assert capsys.readouterr().out == ""                  # once per run

    config = repo_config("imagenet_var.py:depth=30,fsdp=128")
    recipe_mesh = AbstractMesh(mesh_shape(config.mesh, 512), MESH_AXES)
    assert dict(recipe_mesh.shape) == {"data": 4, "fsdp": 128, "tensor": 1}
    shardings = by_path(state_shardings(d30_params, recipe_mesh))
    unsplit = []
    for key, var in by_path(d30_params).items():
        shape, names = var.get_value().shape, var.get_metadata()["out_sharding"]
        if 4 * math.prod(shape) > 2 ** 20:
            if "embed" in names:
                assert math.prod(shardings[key].shard_shape(shape)) * 128 == math.prod(shape), key
            else:
                unsplit.append(key)
    # the only one the table keeps off fsdp: the stacked AdaLN biases, ('layers', 'ada') -> tensor (1.3 MiB)
    assert unsplit == ["['blocks']['ada_lin']['bias']"]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("shape", [(1, 128, 1), (2, 16, 4), (8, 8, 8), (1, 512, 1)])
def test_d30_shardings_equal_the_old_rule_where_it_divides(d30_params, shape):
    mesh = AbstractMesh(shape, MESH_AXES)
    shardings = by_path(state_shardings(d30_params, mesh, report=False))
    compared = 0
    for key, var in by_path(d30_params).items():
        names, shape = var.get_metadata()["out_sharding"], var.get_value().shape
        old = old_rule_spec(names, shape, mesh)
        if wanted_axes(names, mesh) <= {a for e in old for a in _axes(e)}:
            assert shardings[key].spec == old, key
            compared += 1
    assert compared >= 5


def test_optimizer_state_and_restore_use_the_param_shardings(d30_params):
    """abstract_train_state: Adam's moments and the restore target take the params' shardings, fallback included."""
    from var_jax.checkpoints import ModelParts
    from var_jax.train import config_base, optimizer
    from var_jax.train.state import abstract_train_state
    mesh = AbstractMesh((1, 512, 1), MESH_AXES)
    tx = optimizer.make_optimizer(config_base.optim_config(), batch_size=1024, total_steps=10,
                                  mask=optimizer.decay_mask(d30_params))
    layout = abstract_train_state(ModelParts(graphdef=None, rest={}, param_vars=d30_params), tx, mesh)
    specs = lambda tree: jax.tree.map(lambda s: s.spec, tree)
    params = specs(layout.shardings.params)
    assert params["blocks"]["ffn"]["fc1"]["kernel"] == P(None, None, ("tensor", "fsdp"))   # moved by the fallback
    adam = [s for s in jax.tree.leaves(layout.shardings.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    assert adam and all(specs(s.mu) == params and specs(s.nu) == params for s in adam)
    assert jax.tree.map(lambda a: a.sharding.spec, layout.abstract.params) == params


FALLBACK_STEP = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from var_jax.sharding import batch_sharding, make_mesh, state_shardings
from var_jax.transformer import VAR, VARConfig
# width 36 on fsdp=8: `embed` does not divide, so fsdp moves to another dimension where one divides (mlp 144)
cfg = VARConfig(depth=1, width=36, heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2))
graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0))))
rng = np.random.default_rng(SEED)
# random weights straight from numpy: nothing to compile (the model has no buffers, only parameters)
state = jax.tree.map(lambda x: (0.2 * rng.normal(size=x.shape)).astype(x.dtype), abstract)
labels = jnp.asarray(rng.integers(0, 10, size=(8,)))
teacher = jnp.asarray(rng.normal(size=(8, cfg.seq_len - 1, cfg.z_channels)), jnp.float32)
targets = jnp.asarray(rng.integers(0, 64, size=(8, cfg.seq_len)))

def loss(s, l, t, y):
    logits = nnx.merge(graphdef, s)(l, t)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))

ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(state, labels, teacher, targets)
mesh = make_mesh((1, 8, 1))
shardings = state_shardings(state, mesh)
with jax.set_mesh(mesh):
    step = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))
    batch = [jax.device_put(x, batch_sharding(mesh, x.ndim)) for x in (labels, teacher, targets)]
    value, grads = step(jax.device_put(state, shardings), *batch)
flat = dict(nnx.to_flat_state(grads))
fc1 = flat[("blocks", "ffn", "fc1", "kernel")].get_value()
print("RESULT" + json.dumps(dict(
    loss=[float(ref_loss), float(value)],
    grad_rel=max(float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-12))
                 for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
    fc1_spec=str(fc1.sharding.spec), fc1_shard=list(fc1.addressable_shards[0].data.shape))))
"""


def test_a_step_on_fallback_shardings_matches_one_device():
    """8 CPU devices, fsdp=8, width 36: the moved shardings are real placements; loss and gradients equal one
    device's."""
    import json

    from conftest import run_with_devices
    seed = random.randrange(2 ** 31)
    out = json.loads(run_with_devices(FALLBACK_STEP.replace("SEED", str(seed)), 8).split("RESULT", 1)[1])
    assert out["fc1_spec"] == "P(None, None, ('tensor', 'fsdp'))" and out["fc1_shard"] == [1, 36, 18]
    np.testing.assert_allclose(out["loss"][1], out["loss"][0], rtol=1e-5, err_msg=f"seed {seed}")
    assert out["grad_rel"] < 1e-5, (out, seed)


@pytest.mark.parametrize("target,expected", [
    ({"TPU_NAME": "my-v5p-64"}, "compute tpus tpu-vm ssh my-v5p-64 --zone us-east5-a --worker=all --command"),
    ({"QUEUED_RESOURCE": "my-qr"},
     "compute tpus queued-resources ssh my-qr --zone us-east5-a --node=all --worker=all --command"),
])
def test_tpu_pod_launcher_commands(tmp_path, target, expected):
    """launch/tpu_pod.sh, with a stand-in gcloud that prints its arguments: one slice or every slice's workers."""
    import os
    import subprocess

    from conftest import REPO_ROOT
    (tmp_path / "gcloud").write_text('#!/usr/bin/env bash\necho "$@"\n')
    (tmp_path / "gcloud").chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "ZONE": "us-east5-a", **target}
    run = subprocess.run(["bash", "launch/tpu_pod.sh", "--config", "configs/imagenet_var.py:depth=30,slices=2",
                          "--config.mesh_dcn=2,1,1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(expected), run.stdout
    command = "-m var_jax train --distributed --config configs/imagenet_var.py:depth=30\\,slices=2 "
    assert run.stdout.rstrip().endswith(command + "--config.mesh_dcn=2\\,1\\,1"), run.stdout
    missing = subprocess.run(["bash", "launch/tpu_pod.sh"], cwd=REPO_ROOT, capture_output=True, text=True,
                             env={"PATH": env["PATH"], "ZONE": "z"})
    assert missing.returncode == 2 and "set TPU_NAME (one slice) or QUEUED_RESOURCE" in missing.stderr


def test_imagenet_config_mesh_arguments():
    from conftest import repo_config

    from var_jax.cli.common import CommandError
    config = repo_config("imagenet_var.py:depth=30,fsdp=128,slices=2")
    assert config.mesh == (-1, 128, 1) and config.mesh_dcn == (2, 1, 1) and config.sharding_rules == ()
    config = repo_config("imagenet_var.py:depth=16")
    assert config.mesh == (1, -1, 1) and config.mesh_dcn == (1, 1, 1)
    with pytest.raises(CommandError, match="fsdp must be -1 or divide the d30 width 1920, got 256"):
        repo_config("imagenet_var.py:depth=30,fsdp=256")
