"""On 8 simulated CPU devices, the VAR train step (on-the-fly tokenisation included) gives the same losses and
updated parameters on the meshes (8,1,1), (2,4,1), (2,2,2), (1,1,8) and a two-slice mesh (mesh_dcn (2,1,1) x mesh
(2,2,1), the devices arranged as on a multi-slice TPU) as on one device, over several steps."""
import numpy as np

from conftest import run_with_devices

CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np, ml_collections
from flax import nnx
import var_jax
from var_jax.sharding import make_mesh, state_shardings
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.transformer import VAR, VARConfig
from var_jax.train import optimizer
from var_jax.checkpoints import model_parts
from var_jax.train.state import abstract_train_state, init_train_state, jit_train_step
from var_jax.train.var.step import VarStepConfig, make_tokenizer_fn, make_var_train_step
from var_jax.data.pipeline import global_batch_from_host

assert jax.device_count() == 8
tok_cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                          patch_nums=(1, 2, 3, 4))
tok_graphdef, tok_state = nnx.split(VQVAE(tok_cfg, rngs=nnx.Rngs(1)))
tok_vars = tok_state
tok_state = nnx.to_pure_dict(tok_state)
var_cfg = VARConfig(depth=2, width=64, heads=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4),
                    drop_path_rate=0.1, cond_drop_rate=0.1, init_head=1.0)
model_fn = lambda rngs: VAR(var_cfg, rngs=rngs)
parts = model_parts(model_fn)
# eps 1e-4 (not 1e-8): with |g| ~ eps, Adam's g/(|g|+eps) has slope 1/eps and turns float32 reduction-order
# noise of near-zero gradients into visible parameter differences; the sharding is what is under test here
optim = ml_collections.ConfigDict(dict(tblr=3e-2, b1=0.9, b2=0.95, eps=1e-4, warmup_steps=1, warmup_fraction=0.0,
                                       wp0=0.005, wpe=0.1, schedule="lin0", wd=0.05, wd_end=0.1, grad_clip=2.0))
tx = optimizer.make_optimizer(optim, batch_size=8, total_steps=5, mask=optimizer.decay_mask(parts.param_vars))
step_fn = make_var_train_step(parts, tx, VarStepConfig(patch_nums=(1, 2, 3, 4)), make_tokenizer_fn(tok_graphdef, tok_cfg))
rng = np.random.default_rng(SEED)
batches = [{"image": np.tanh(rng.normal(size=(8, 16, 16, 3))).astype(np.float32),
            "label": rng.integers(0, 10, size=(8,)).astype(np.int32)} for _ in range(3)]

one_device = make_mesh((1, 1, 1), devices=jax.devices()[:1])
initial = jax.tree.map(np.asarray, init_train_state(model_fn, tx, abstract_train_state(parts, tx, one_device),
                                                    one_device, seed=0))

def run(mesh_shape, devices=None):
    mesh = mesh_shape if isinstance(mesh_shape, jax.sharding.Mesh) else make_mesh(mesh_shape, devices=devices)
    layout = abstract_train_state(parts, tx, mesh)
    state = jax.device_put(initial, layout.shardings)
    tok_sh = nnx.to_pure_dict(state_shardings(tok_vars, mesh))
    frozen = jax.device_put(tok_state, tok_sh)
    step = jit_train_step(step_fn, layout, mesh, batches[0], tok_sh)
    losses = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, m = step(state, global_batch_from_host(b, mesh), frozen)
            losses.append([float(m["loss"]), float(m["grad_norm"]), float(m["Accm"])])
    shard_specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
    return losses, jax.tree.map(np.asarray, state.params), shard_specs

ref_losses, ref_params, _ = run((1, 1, 1), devices=jax.devices()[:1])
assert not np.allclose(jax.tree.leaves(ref_params)[0], jax.tree.leaves(initial.params)[0])
out = {"ref": ref_losses}
# two slices of 4 CPU devices (even ids, odd ids) as a multi-slice TPU job lays them out: mesh_dcn (2, 1, 1) x
# mesh (2, 2, 1), each slice one block of the data axis
from test_mesh import sliced_cpu_mesh
hybrid = sliced_cpu_mesh((2, 2, 1), (2, 1, 1), slice_of=lambda d: d.id % 2)
assert dict(hybrid.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
assert [d.id for d in hybrid.devices.flat] == [0, 2, 4, 6, 1, 3, 5, 7]
for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8), hybrid]:
    losses, params, specs = run(shape)
    shape = "hybrid" if shape is hybrid else shape
    # relative L2 difference per parameter array (elementwise, Adam's first steps move near-zero-gradient
    # entries by ±lr whatever the gradient's last bits, so a norm is the meaningful measure)
    rel = max(float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    out[str(shape)] = {"losses": losses, "param_rel": rel, "specs": specs}
print("RESULT" + json.dumps(out))
"""


def test_meshes_match_single_device():
    import json
    import random

    import numpy as np
    seed = random.randrange(2 ** 31)
    out = run_with_devices(CODE.replace("SEED", str(seed)), 8)
    result = json.loads(out.split("RESULT", 1)[1])
    ref = np.array(result.pop("ref"))
    assert np.all(np.isfinite(ref)) and ref[0, 0] > 3.0
    for shape, r in result.items():
        np.testing.assert_allclose(np.array(r["losses"]), ref, rtol=1e-5, atol=1e-6, err_msg=f"{shape} seed {seed}")
        assert r["param_rel"] < 1e-5, (shape, r["param_rel"], seed)
    # the meshes really shard: FSDP splits `embed`, tensor parallelism splits `mlp`/`vocab`
    assert any("fsdp" in s for s in result["(2, 4, 1)"]["specs"])
    assert any("tensor" in s for s in result["(1, 1, 8)"]["specs"])
    assert any("fsdp" in s for s in result["hybrid"]["specs"])


def test_local_multiprocess_launcher(tmp_path):
    """launch/local_multiprocess.sh: 2 processes × 2 CPU devices joined by jax.distributed give the same losses
    as one process with 4 devices (the multi-host path: per-host data shards, global batch assembly,
    cross-process collectives and checkpoints). About a minute."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from flax import nnx

    from var_jax.checkpoints import save_model_dir
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE
    cfg = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                          patch_nums=(1, 2, 3, 4))
    save_model_dir(tmp_path / "tok", tokenizer=(cfg, VQVAE(cfg, rngs=nnx.Rngs(0))))
    args = ["--config", "configs/digits_var.py:depth=2,width=64,batch=8,image_size=16",
            f"--config.tokenizer_checkpoint={tmp_path / 'tok'}", "--config.patch_nums=(1,2,3,4)",
            "--config.total_steps=3", "--config.log_every=1", "--config.sample_every=0", "--config.mesh=(2,2,1)",
            # class dropout is drawn per row of the global batch: the hosts' blocks must rebuild its row order
            "--config.model.cond_drop_rate=0.5"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), LOG_DIR=str(tmp_path), PORT=str(12000 + os.getpid() % 1000))
    multi = subprocess.run(["bash", "launch/local_multiprocess.sh", *args, "--workdir", str(tmp_path / "multi")],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert multi.returncode == 0, multi.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "var_jax", "train", *args, "--workdir", str(tmp_path / "single")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert single.returncode == 0, single.stderr[-3000:]
    read = lambda d: [json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert len(read("multi")) == 3
    np.testing.assert_allclose(read("multi"), read("single"), rtol=1e-5)
