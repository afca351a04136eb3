"""Sampler throughput of a VAR-d16 (random weights) with the released tokenizer's shape at 256 px.

    python benchmarks/sample_bench.py [--batch 4] [--modes unrolled,grouped,scanned] [--repeats 2]

Settings: B images with guidance (cfg 1.5, top-k 900, top-p 0.96), i.e. 2B transformer rows. For every sampler mode:
compile time, run time of the transformer part (tokens and f_hat, no decode), images/s including the decode, and
XLA's memory estimate of the compiled program. The decode (VQVAE decoder on f_hat) is timed on its own. The
fraction of the machine's float32 matmul peak (measured here with a large jitted matmul) uses analytic FLOPs for
the transformer (useful work only: padding in the scanned modes is not counted) and the convolutions of the decoder's
jaxpr.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from var_jax.sample.sampler import SampleOptions, make_sample_fn  # noqa: E402
from var_jax.sample.schedule import MODES, describe, scale_plan  # noqa: E402
from var_jax.tokenizer.config import TokenizerConfig  # noqa: E402
from var_jax.host_memory import release_freed_memory  # noqa: E402
from var_jax.tokenizer.vqvae import VQVAE, merge_for_decoding, split_for_decoding  # noqa: E402
from var_jax.transformer.config import preset  # noqa: E402
from var_jax.transformer.model import VAR  # noqa: E402
from rss import reset_rss_peak, rss_peak  # noqa: E402
from tokenizer_bench import matmul_flops  # noqa: E402


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this machine, from an n×n×n jitted matmul."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pass_flops(cfg, tokens: int, attention, scale_tokens: int | None = None) -> float:
    """Matmul FLOPs of one transformer pass of one row: `tokens` through every layer, 24·C² each (qkv 6C², proj
    2C², FFN 16C²), attention 4·C per (query, key) pair of the (queries, keys) groups in `attention`, the AdaLN
    projections, and the word embedding and head over `scale_tokens` (default `tokens`; more where a pass computes
    only some of its scale's tokens, see benchmarks/accelerate.py)."""
    C, V, depth = cfg.width, cfg.vocab_size, cfg.depth
    scale_tokens = tokens if scale_tokens is None else scale_tokens
    per_layer = (2 * tokens * C * (3 * C + C + 2 * cfg.mlp_hidden) + sum(4 * q * k * C for q, k in attention)
                 + 2 * C * 6 * C)
    return depth * per_layer + 2 * scale_tokens * C * V + 2 * C * 2 * C + 2 * scale_tokens * cfg.z_channels * C


def transformer_flops(cfg, rows: int) -> float:
    """Matmul FLOPs of one sampling pass over all scales (exact shapes): each scale's pass attends to every token
    so far (useful work only)."""
    total, kv = 0.0, 0
    for pn in cfg.patch_nums:
        kv += pn * pn
        total += pass_flops(cfg, pn * pn, [(pn * pn, kv)])
    return rows * total


def memory_estimate(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    print(f"jax {jax.__version__}, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    peak = matmul_peak_flops()
    print(f"float32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s")

    tok_cfg = TokenizerConfig()
    var_cfg = preset(args.depth, patch_nums=tok_cfg.patch_nums)
    t = time.perf_counter()
    tokenizer = VQVAE(tok_cfg, rngs=nnx.Rngs(0))
    var = VAR(var_cfg, rngs=nnx.Rngs(1))
    print(f"built d{args.depth} ({var.num_params():,} params) and tokenizer in {time.perf_counter() - t:.1f} s")
    vg, vs = nnx.split(var)
    # as the sample command holds them: the tokenizer without its encoder (sampling never encodes)
    tg, ts, encoder_spec = split_for_decoding(tokenizer)
    del var, tokenizer
    # the sampler's own resident peak: from here on (random init's temporaries excluded), weights included
    jax.block_until_ready((vs, ts))
    release_freed_memory()
    reset_rss_peak()
    resident = rss_peak()

    labels = np.arange(args.batch, dtype=np.int32) * 97 % var_cfg.num_classes
    ids = np.arange(args.batch)
    rows = 2 * args.batch
    flops_tf = transformer_flops(var_cfg, rows)

    # the decoder alone
    decoder = lambda state, f: merge_for_decoding(tg, state, encoder_spec).decode(f)
    decode = jax.jit(decoder)
    f_hat = jnp.zeros((args.batch, tok_cfg.latent_size, tok_cfg.latent_size, tok_cfg.z_channels), jnp.float32)
    t = time.perf_counter()
    decode_compiled = decode.lower(ts, f_hat).compile()
    decode_compile = time.perf_counter() - t
    # counted from the jaxpr: XLA's cost analysis counts the one-image-at-a-time loop body once
    decode_flops = matmul_flops(decoder, ts, f_hat)
    decode_compiled(ts, f_hat).block_until_ready()
    decode_time = min(_timed(lambda: decode_compiled(ts, f_hat).block_until_ready()) for _ in range(args.repeats))
    print(f"decode: compile {decode_compile:.1f} s, {decode_time:.2f} s per batch, {decode_flops / 1e9:.0f} GFLOP "
          f"(conv + dot), {decode_flops / decode_time / 1e9:.1f} GFLOP/s = {decode_flops / decode_time / peak:.0%} of peak"
          f", memory estimate {memory_estimate(decode_compiled) / 2**20:.0f} MiB")

    options = dict(cfg=1.5, top_k=900, top_p=0.96)
    print(f"transformer: {flops_tf / 1e9:.0f} GFLOP per batch of {args.batch} ({rows} rows with guidance)")
    results = {}
    for mode in args.modes.split(","):
        fn = make_sample_fn(vg, tg, SampleOptions(**options, mode=mode), decode=False, encoder_spec=encoder_spec)
        t = time.perf_counter()
        compiled = fn.lower(vs, ts, labels, ids, 0).compile()
        compile_time = time.perf_counter() - t
        release_freed_memory()   # as the sample command's Sampler does after compiling
        out = compiled(vs, ts, labels, ids, 0)
        jax.block_until_ready(out)
        run = min(_timed(lambda: jax.block_until_ready(compiled(vs, ts, labels, ids, 0)))
                  for _ in range(args.repeats))
        total = run + decode_time
        results[mode] = (run, [np.asarray(x) for x in out["tokens"]])
        print(f"{mode:9s} [{describe(scale_plan(tok_cfg.patch_nums, mode))}] compile {compile_time:.1f} s, "
              f"transformer part {run:.2f} s ({flops_tf / run / 1e9:.1f} GFLOP/s = {flops_tf / run / peak:.0%} of "
              f"peak), with decode {total:.2f} s = {args.batch / total:.3f} images/s, "
              f"memory estimate {memory_estimate(compiled) / 2**20:.0f} MiB")
    modes = list(results)
    same = all(all(np.array_equal(a, b) for a, b in zip(results[modes[0]][1], results[m][1])) for m in modes)
    print(f"all modes identical tokens: {same}; fastest: {min(results, key=lambda m: results[m][0])}")
    peak = rss_peak()
    if peak is not None:
        print(f"peak RSS while compiling and sampling {peak / 2**30:.2f} GiB ({resident / 2**30:.2f} GiB resident "
              f"before: weights and runtime)")
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (random init "
          f"included), load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
