"""Tokenizer throughput: encode (image -> tokens) and decode (tokens -> image), jitted, after warm-up.

    python benchmarks/tokenizer_bench.py                       # released shape (ch 160, V 4096, Cvae 32), 256 px, batch 4
    python benchmarks/tokenizer_bench.py --batch-size 32 --iters 20

Random weights (the released tokenizer's shapes). Prints images/s, time per batch, compile time, XLA's compiled
memory analysis (arguments / outputs / temporaries) and the process's peak resident memory.
"""
from __future__ import annotations

import argparse
import resource
import time

import jax
from flax import nnx

from var_jax.tokenizer import quantizer
from var_jax.tokenizer.config import REFERENCE_PATCH_NUMS, TokenizerConfig
from var_jax.tokenizer.vqvae import VQVAE


def encode(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return quantizer.f_to_tokens(model.quantizer_params(), model.encode(images), model.cfg)[0]


def decode(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    return model.decode(quantizer.tokens_to_fhat(model.quantizer_params(), tokens, model.cfg))


def measure(name, fn, args, iters):
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=0).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args[1:]))             # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        out = compiled(*args[1:])
    jax.block_until_ready(out)
    per_batch = (time.perf_counter() - t0) / iters
    mem = compiled.memory_analysis()
    mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "n/a"
    return (name, per_batch, compile_s, mib(getattr(mem, "argument_size_in_bytes", None)),
            mib(getattr(mem, "output_size_in_bytes", None)), mib(getattr(mem, "temp_size_in_bytes", None))), out


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

    header = ("op", "images/s", "ms/batch", "compile s", "args MiB", "out MiB", "temp MiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, per_batch, compile_s, arg_mib, out_mib, temp_mib in rows:
        print(f"| {name} | {args.batch_size / per_batch:.2f} | {per_batch * 1e3:.0f} | {compile_s:.1f} | "
              f"{arg_mib} | {out_mib} | {temp_mib} |")
    print(f"peak resident memory (maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB")


if __name__ == "__main__":
    main()
