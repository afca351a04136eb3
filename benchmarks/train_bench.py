"""VAR train-step throughput and memory.

    python benchmarks/train_bench.py                      # d8, 256 px, batch 4, this machine's devices
    python benchmarks/train_bench.py --depth 16 --batch 8 --steps 3 --memory-depths ''

1. Measures this machine's float32 matmul peak (a big jitted matmul), then times the d8 train step at 256 px
   (patch_nums up to 16, V 4096, Cvae 32) with and without on-the-fly tokenisation (the released tokenizer's
   shape, random weights): s/step, images/s, tokens/s, achieved FLOP/s (analytic VAR count, and XLA's own
   count of the compiled step, which covers the scanned block once) and MFU against the measured peak.
2. Per-device memory of the compiled step for d16 and d30 on a simulated 8-device FSDP mesh: compile only
   (`.lower().compile().memory_analysis()` on abstract params; nothing is allocated), in a subprocess.
3. With `--grad-accum K`: XLA's memory estimate of the compiled d{depth} step (tokenising in the step) at the
   same global batch `--batch` as one batch and as K micro-batches (config.grad_accum_steps), on this
   machine's devices; compile only.

    python benchmarks/train_bench.py --skip-throughput --memory-depths '' --depth 8 --batch 8 --grad-accum 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import var_jax  # noqa: E402,F401  (its CPU XLA flags, before JAX starts a backend)


def optim_config():
    from var_jax.train.config_base import optim_config as reference
    return reference(warmup_steps=1)


def measure_matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """float32 FLOP/s of a jitted n×n matmul chain (best of a few timings)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)

    @jax.jit
    def chain(a, b):
        for _ in range(reps):
            a = (a @ b) * (1.0 / n)
        return a
    chain(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        chain(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 * reps / best


def build(depth: int, batch: int, mesh, *, with_tokenizer: bool, remat: str = "none", abstract: bool = False,
          compute_dtype: str = "auto", grad_accum: int = 1):
    """(jitted step, layout, frozen tokenizer state or abstract, tokenizer fn, VARConfig, tokenizer parts)."""
    import jax
    from flax import nnx

    from var_jax.sharding import state_shardings
    from var_jax.tokenizer.config import TokenizerConfig
    from var_jax.tokenizer.vqvae import VQVAE
    from var_jax.train import optimizer
    from var_jax.checkpoints import model_parts
    from var_jax.train.state import abstract_train_state, jit_train_step
    from var_jax.train.var.step import VarStepConfig, make_tokenizer_fn, make_var_train_step
    from var_jax.transformer import VAR, RunSettings, preset

    tok_cfg = TokenizerConfig()                  # the released tokenizer's shape
    var_cfg = preset(depth, num_classes=1000, vocab_size=tok_cfg.vocab_size, z_channels=tok_cfg.z_channels,
                     patch_nums=tok_cfg.patch_nums).with_run_settings(RunSettings(compute_dtype=compute_dtype,
                                                                                  remat=remat))
    parts = model_parts(lambda rngs: VAR(var_cfg, rngs=rngs))
    tx = optimizer.make_optimizer(optim_config(), batch_size=batch, total_steps=1000,
                                  mask=optimizer.decay_mask(parts.param_vars))
    layout = abstract_train_state(parts, tx, mesh)

    tok_abstract = nnx.eval_shape(lambda: VQVAE(tok_cfg, rngs=nnx.Rngs(0)))
    tok_graphdef, tok_vars = nnx.split(tok_abstract)
    tok_shardings = nnx.to_pure_dict(state_shardings(tok_vars, mesh))
    if abstract:
        tok_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 nnx.to_pure_dict(tok_vars), tok_shardings)
    else:
        tok_state = jax.jit(lambda: nnx.to_pure_dict(nnx.split(VQVAE(tok_cfg, rngs=nnx.Rngs(0)))[1]),
                            out_shardings=tok_shardings)()
    tokenize = make_tokenizer_fn(tok_graphdef, tok_cfg)
    size, L = tok_cfg.image_size, var_cfg.seq_len
    if with_tokenizer:
        batch_example = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), "uint8"),   # as the pipeline sends
                         "label": jax.ShapeDtypeStruct((batch,), "int32")}
    else:
        batch_example = {"tokens": jax.ShapeDtypeStruct((batch, L), "int32"),
                         "teacher_input": jax.ShapeDtypeStruct((batch, L - 1, var_cfg.z_channels), "float32"),
                         "label": jax.ShapeDtypeStruct((batch,), "int32")}
    step_fn = make_var_train_step(parts, tx, VarStepConfig(patch_nums=var_cfg.patch_nums, grad_accum_steps=grad_accum),
                                  tokenize if with_tokenizer else None)
    step = jit_train_step(step_fn, layout, mesh, batch_example, tok_shardings if with_tokenizer else None)
    return step, layout, tok_state, tokenize, var_cfg, batch_example, parts, tx


def compiled_train_step(depth: int, batch: int, mesh, with_tokenizer: bool, compute_dtype: str = "auto",
                        remat: str = "none") -> dict:
    """The compiled d{depth} train step at 256 px with its initial state and a random batch (images when the step
    tokenises, else pre-computed tokens); also used by compare.py and accelerator.py."""
    import jax
    import numpy as np

    from var_jax.data.pipeline import global_batch_from_host
    from var_jax.train.state import init_train_state
    from var_jax.transformer import VAR

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, 256, 256, 3), dtype=np.uint8)   # as the pipeline sends them
    labels = rng.integers(0, 1000, size=(batch,)).astype(np.int32)
    step, layout, tok_state, tokenize, var_cfg, _, _, tx = build(depth, batch, mesh, with_tokenizer=with_tokenizer,
                                                                 remat=remat, compute_dtype=compute_dtype)
    with jax.set_mesh(mesh):
        state = init_train_state(lambda rngs: VAR(var_cfg, rngs=rngs), tx, layout, mesh, seed=0)
        if with_tokenizer:
            batch_data = global_batch_from_host({"image": images, "label": labels}, mesh)
            frozen = tok_state
        else:
            tokens, teacher = jax.jit(tokenize)(tok_state, images)
            batch_data = global_batch_from_host({"tokens": np.asarray(tokens), "teacher_input": np.asarray(teacher),
                                                 "label": labels}, mesh)
            frozen = None
        t = time.perf_counter()
        compiled = step.lower(state, batch_data, frozen).compile()
        compile_s = time.perf_counter() - t
    return {"compiled": compiled, "state": state, "batch": batch_data, "frozen": frozen, "compile_s": compile_s,
            "var_cfg": var_cfg, "tokenize": tokenize, "tok_state": tok_state, "images": images}


def time_steps(depth: int, batch: int, steps: int, compute_dtype: str = "auto") -> list[dict]:
    import jax

    from var_jax.sharding import make_mesh
    from var_jax.train.var import flops

    mesh = make_mesh((-1, 1, 1))
    rows = []
    for with_tokenizer in (False, True):
        prepared = compiled_train_step(depth, batch, mesh, with_tokenizer, compute_dtype)
        compiled, state, batch_data, frozen = (prepared[k] for k in ("compiled", "state", "batch", "frozen"))
        compile_s, var_cfg = prepared["compile_s"], prepared["var_cfg"]
        with jax.set_mesh(mesh):
            xla_flops = flops.compiled_flops(compiled)
            state, m = compiled(state, batch_data, frozen)       # warm-up
            jax.block_until_ready(m)
            # the peak is measured right beside the timing: this machine is shared, its load varies
            peak = measure_matmul_peak()
            t = time.perf_counter()
            for _ in range(steps):
                state, m = compiled(state, batch_data, frozen)
            jax.block_until_ready((state, m))
            per_step = (time.perf_counter() - t) / steps
            peak = (peak + measure_matmul_peak()) / 2
        var_flops = flops.var_train_flops_per_example(var_cfg) * batch
        row = {"tokenize_in_step": with_tokenizer, "depth": depth, "batch": batch, "s_per_step": per_step,
               "matmul_peak_flops_per_s": peak,
               "compile_s": compile_s, "images_per_s": batch / per_step, "tokens_per_s": batch * var_cfg.seq_len / per_step,
               "var_flops_per_step": var_flops, "xla_flops_per_step": xla_flops,
               "achieved_flops_per_s_var": var_flops / per_step,
               "mfu_var": var_flops / per_step / peak,
               "loss": float(m["loss"])}
        rows.append(row)
        del state, prepared
    return rows


def compiled_memory(depth: int, batch: int, mesh, remat: str, grad_accum: int = 1) -> dict:
    """XLA's per-device memory estimate of the compiled d{depth} step (tokenising in the step), compiled on
    abstract params and batch: nothing is allocated."""
    import jax

    from var_jax.train.state import batch_shardings, param_count
    step, layout, tok_state, _, var_cfg, batch_example, _, _ = build(depth, batch, mesh, with_tokenizer=True,
                                                                     remat=remat, abstract=True, grad_accum=grad_accum)
    shardings = batch_shardings(mesh, batch_example)
    batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                      for k, v in batch_example.items()}
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(layout.abstract, batch_abstract, tok_state).compile()
    mem = compiled.memory_analysis()
    gib = lambda b: b / 2 ** 30
    return {"depth": depth, "devices": mesh.size, "mesh": dict(mesh.shape), "global_batch": batch,
            "grad_accum_steps": grad_accum, "remat": remat, "params": param_count(layout.abstract.params),
            "compile_s": time.perf_counter() - t,
            "argument_gib": gib(mem.argument_size_in_bytes), "output_gib": gib(mem.output_size_in_bytes),
            "temp_gib": gib(mem.temp_size_in_bytes), "alias_gib": gib(mem.alias_size_in_bytes),
            "peak_estimate_gib": gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes)}


def memory_report(depths, per_device_batch: int, remat: str) -> list[dict]:
    """Run inside a process with 8 simulated devices: compile the step on an FSDP mesh, report bytes."""
    from var_jax.sharding import make_mesh
    mesh = make_mesh((1, -1, 1))
    return [compiled_memory(depth, per_device_batch * mesh.size, mesh, remat) for depth in depths]


def grad_accum_report(depth: int, batch: int, steps: int, remat: str) -> list[dict]:
    """The same global batch as one batch and as `steps` micro-batches, on this machine's devices."""
    from var_jax.sharding import make_mesh
    mesh = make_mesh((-1, 1, 1))
    return [compiled_memory(depth, batch, mesh, remat, grad_accum=k) for k in (1, steps)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-depths", default="16,30", help="comma-separated; '' skips the memory part")
    parser.add_argument("--memory-per-device-batch", type=int, default=4)
    parser.add_argument("--remat", default="block", choices=("none", "block"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="compute dtype of the throughput part ('auto': the backend's)")
    parser.add_argument("--grad-accum", type=int, default=0, metavar="K",
                        help="also compare XLA's memory estimate of the d{depth} step at global batch --batch as one "
                             "batch and as K micro-batches (compile only)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)   # the subprocess
    args = parser.parse_args()
    if args.grad_accum > 1 and args.batch % args.grad_accum:
        parser.error(f"--grad-accum {args.grad_accum} must divide --batch {args.batch}")

    if args.memory_only:
        depths = [int(d) for d in args.memory_depths.split(",") if d]
        print("MEMORY" + json.dumps(memory_report(depths, args.memory_per_device_batch, args.remat)))
        return

    if not args.skip_throughput:
        for row in time_steps(args.depth, args.batch, args.steps, args.dtype):
            kind = "with tokenisation   " if row["tokenize_in_step"] else "pre-computed tokens "
            # XLA's count covers the scanned transformer block once (a while loop), the tokenizer fully
            xla = (f", XLA count (block counted once) {row['xla_flops_per_step'] / 1e9:.0f} GFLOP/step"
                   if row.get("xla_flops_per_step") else "")
            print(f"d{row['depth']} batch {row['batch']} {kind}: {row['s_per_step']:.3f} s/step, "
                  f"{row['images_per_s']:.2f} images/s, {row['tokens_per_s']:.0f} tokens/s; VAR analytic "
                  f"{row['achieved_flops_per_s_var'] / 1e9:.1f} GFLOP/s vs measured float32 matmul peak "
                  f"{row['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s = MFU {row['mfu_var']:.1%}{xla} "
                  f"(compile {row['compile_s']:.1f} s, loss {row['loss']:.4f})")
            print("ROW " + json.dumps(row))

    if args.memory_depths:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, __file__, "--memory-only", "--memory-depths", args.memory_depths,
                               "--memory-per-device-batch", str(args.memory_per_device_batch), "--remat", args.remat],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:])
            raise SystemExit("memory analysis failed")
        for row in json.loads(proc.stdout.split("MEMORY", 1)[1]):
            print(f"d{row['depth']} ({row['params'] / 1e6:.0f}M params) on {row['devices']} devices FSDP, global batch "
                  f"{row['global_batch']}, remat {row['remat']}: per device arguments {row['argument_gib']:.2f} GiB, "
                  f"temporaries {row['temp_gib']:.2f} GiB, outputs {row['output_gib']:.2f} GiB (aliased "
                  f"{row['alias_gib']:.2f}); peak ≈ {row['peak_estimate_gib']:.2f} GiB (compile {row['compile_s']:.0f} s)")

    if args.grad_accum > 1:
        print(f"| d{args.depth}, global batch {args.batch}, remat {args.remat} | micro-batch | temporaries GiB "
              "| arguments GiB | peak estimate GiB |\n|---|---|---|---|---|")
        for row in grad_accum_report(args.depth, args.batch, args.grad_accum, args.remat):
            k = row["grad_accum_steps"]
            print(f"| grad_accum_steps={k} | {row['global_batch'] // k} | {row['temp_gib']:.3f} | "
                  f"{row['argument_gib']:.3f} | {row['peak_estimate_gib']:.3f} |")
            print("ROW " + json.dumps(row))


if __name__ == "__main__":
    main()
