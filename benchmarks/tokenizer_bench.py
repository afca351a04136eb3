"""Tokenizer throughput: encode (image -> tokens) and decode (tokens -> image), jitted, after warm-up.

    python benchmarks/tokenizer_bench.py                       # released shape (ch 160, V 4096, Cvae 32), 256 px, batch 4
    python benchmarks/tokenizer_bench.py --batch-size 32 --iters 20

Random weights (the released tokenizer's shapes). Prints images/s, time per batch (min and median over the timed
iterations), compile time, the conv/matmul FLOPs counted from the jaxpr and their rate as a fraction of a float32
matmul measured in the same process just before (so a loaded, shared machine is measured against itself), XLA's
compiled memory analysis (arguments / outputs / temporaries) and the process's peak resident memory.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import jaxprs_in_params

from var_jax.scale_config import REFERENCE_PATCH_NUMS
from var_jax.tokenizer import quantizer
from var_jax.tokenizer.config import TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE


def encode(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return quantizer.f_to_tokens(model.quantizer_params(), model.encode(images, per_sample=True), model.cfg)[0]


def decode(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    return model.decode(quantizer.tokens_to_fhat(model.quantizer_params(), tokens, model.cfg))


def matmul_flops(fn, *args) -> int:
    """FLOPs of the convolutions and dot products in fn's jaxpr (2 per multiply-add), nested jaxprs included
    (scan bodies times their length)."""
    def count(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                kernel = eqn.invars[1].aval.shape   # the rhs spec puts in/out features somewhere; all but out count
                out_features = eqn.outvars[0].aval.shape[eqn.params["dimension_numbers"].out_spec[1]]
                total += 2 * eqn.outvars[0].aval.size * math.prod(kernel) // out_features
            elif eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                total += 2 * eqn.outvars[0].aval.size * math.prod(eqn.invars[0].aval.shape[i] for i in contract)
            # a scan's body (lax.map: the one-image-at-a-time encoder/decoder) runs `length` times
            trips = eqn.params["length"] if eqn.primitive.name == "scan" else 1
            for sub in jaxprs_in_params(eqn.params):
                total += trips * count(sub)
        return total
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def matmul_rate(n=2048, iters=3) -> float:
    """Best float32 matmul rate (FLOP/s) of an n^3 product here and now: the yardstick for 'fraction of peak'."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(iters):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def measure(name, fn, args, iters):
    flops = matmul_flops(lambda *arrays: fn(args[0], *arrays), *args[1:])   # args[0]: the static graphdef
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=0).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args[1:]))        # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args[1:]))
        times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "n/a"
    return (name, min(times), statistics.median(times), flops, compile_s,
            mib(getattr(mem, "argument_size_in_bytes", None)), mib(getattr(mem, "output_size_in_bytes", None)),
            mib(getattr(mem, "temp_size_in_bytes", None))), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256, choices=sorted(REFERENCE_PATCH_NUMS))
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    cfg = TokenizerConfig(patch_nums=REFERENCE_PATCH_NUMS[args.image_size])
    t0 = time.perf_counter()
    model = VQVAE(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}; tokenizer {n_params:,} params "
          f"(init {time.perf_counter() - t0:.1f} s); batch {args.batch_size} at {cfg.image_size} px; "
          f"{args.iters} timed iterations after warm-up")

    images = jax.random.uniform(jax.random.key(1), (args.batch_size, cfg.image_size, cfg.image_size, 3),
                                minval=-1.0, maxval=1.0)
    rows = []
    row, tokens = measure("encode (image -> tokens)", encode, (graphdef, state, images), args.iters)
    rows.append(row)
    row, _ = measure("decode (tokens -> image)", decode, (graphdef, state, tokens), args.iters)
    rows.append(row)

    peak = matmul_rate()
    print(f"float32 2048^3 matmul here, now: {peak / 1e9:.0f} GFLOP/s (the 'peak' below); "
          f"load average {os.getloadavg()[0]:.1f}")
    header = ("op", "images/s (best)", "s/batch min", "s/batch median", "conv+dot GFLOP", "GFLOP/s", "of peak",
              "compile s", "args MiB", "out MiB", "temp MiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, best, median, flops, compile_s, arg_mib, out_mib, temp_mib in rows:
        print(f"| {name} | {args.batch_size / best:.3f} | {best:.2f} | {median:.2f} | {flops / 1e9:.0f} | "
              f"{flops / best / 1e9:.1f} | {flops / best / peak:.0%} | {compile_s:.1f} | {arg_mib} | {out_mib} | "
              f"{temp_mib} |")
    print(f"peak resident memory (maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB")


if __name__ == "__main__":
    main()
