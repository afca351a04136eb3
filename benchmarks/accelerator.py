"""One accelerator's numbers: VAR train steps at d16/d20/d24/d30 and d16 sampling, against the device's peak.

Run it through benchmarks/accelerator.sh, which calls this once per workload (each in a fresh process, so that the
device's peak memory belongs to that workload alone) and then once more to print the table:

    python benchmarks/accelerator.py peak --out rows.jsonl
    python benchmarks/accelerator.py train --depth 16 --batch-per-device 48 --out rows.jsonl
    python benchmarks/accelerator.py sample --depth 16 --batch 64 --out rows.jsonl
    python benchmarks/accelerator.py table rows.jsonl

The workloads are compare.py's var-jax side (train_bench's compiled step with the tokenizer in it, uint8 images
as the pipeline sends them; sample_bench's sampler with decode, cfg 1.5, top-k 900, top-p 0.96), here in
bfloat16 by default. FLOPs: the analytic VAR train count plus the tokenizer's conv/dot FLOPs (train), the
sampler's transformer count plus the decoder's (sample). MFU is given against the device's spec bf16 dense peak
(SPEC_BF16_TFLOPS by jax.devices()[0].device_kind, or --spec-tflops / ACCEL_SPEC_TFLOPS) and against a bf16
matmul peak measured on the device, both times the number of devices.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))           # the sibling benchmark scripts

import compare  # noqa: E402  (puts the repository on sys.path too)

# Dense bf16 peaks per device in TFLOP/s, vendor datasheets (no sparsity), matched as lower-case substrings of
# device_kind in this order (the more specific names first: 'h100 pcie' before 'h100', 'v5 lite' before 'v5').
SPEC_BF16_TFLOPS = (
    ("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
    ("v6 lite", 918.0), ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v5", 459.0),
    ("v4", 275.0),
)

# Exit status of a train workload that ran out of device memory under --retry-on-oom (accelerator.sh then runs it
# again with remat 'block').
OUT_OF_MEMORY = 75


def spec_tflops(device_kind: str, override: float | None = None) -> float | None:
    """The device's dense bf16 peak from SPEC_BF16_TFLOPS (None when unknown), unless `override` is given."""
    if override:
        return override
    kind = device_kind.lower()
    return next((tflops for pattern, tflops in SPEC_BF16_TFLOPS if pattern in kind), None)


def device_peak_bytes() -> int | None:
    """The device's peak bytes in use over this process's life (None where the backend does not report it)."""
    import jax
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def timed(run, steps: int) -> float:
    """Median seconds of `steps` calls of run() (each blocks), after one warm-up call."""
    run()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def train_row(depth: int, batch_per_device: int, steps: int, dtype: str, remat: str) -> dict:
    import jax
    batch = batch_per_device * jax.device_count()
    run, compile_s, info = compare.jax_train(depth, batch, True, compute_dtype=dtype, remat=remat)
    return workload_row(f"train d{depth}", jax.device_count(), batch_per_device, run, steps, compile_s, info, remat)


def sample_row(depth: int, batch: int, steps: int, dtype: str) -> dict:
    """The sampler runs unsharded, on one device."""
    run, compile_s, info = compare.jax_sample(depth, batch, compute_dtype=dtype)
    return workload_row(f"sample d{depth} (cfg 1.5, decode)", 1, batch, run, steps, compile_s, info, "-")


def workload_row(workload: str, devices: int, batch_per_device: int, run, steps: int, compile_s: float, info: dict,
                 remat: str) -> dict:
    """Time run() and make its table row; `info` is what compare.jax_train / jax_sample report."""
    step_s, batch = timed(run, steps), batch_per_device * devices
    return {"kind": "workload", "workload": workload, "devices": devices, "batch_per_device": batch_per_device,
            "images_per_s": batch / step_s, "tokens_per_s": batch * info["seq_len"] / step_s, "step_s": step_s,
            "flops_per_step": info["flops"], "compile_s": compile_s, "remat": remat,
            "compute_dtype": info["compute_dtype"], "peak_bytes": device_peak_bytes(),
            "xla_memory_estimate_bytes": info["xla_memory_estimate_bytes"]}


def peak_row(matmul_n: int, spec_override: float | None) -> dict:
    import jax
    kind = jax.devices()[0].device_kind
    measured = compare.jax_matmul_peak(matmul_n, "bfloat16", calls=20)   # on one device (the default one)
    spec = spec_tflops(kind, spec_override)
    return {"kind": "peak", "device_kind": kind, "platform": jax.devices()[0].platform,
            "device_count": jax.device_count(), "jax": jax.__version__, "matmul_n": matmul_n,
            "measured_bf16_flops_per_s": measured, "spec_bf16_flops_per_s": spec * 1e12 if spec else None}


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ----------------------------------------------------------------------------------------------------- table

def _gib(x) -> str:
    return f"{x / 2 ** 30:.2f}" if x else "-"


def _pct(x) -> str:
    return f"{x:.1%}" if x else "-"


def table(rows: list[dict]) -> str:
    """The markdown table of the workload rows, headed by the device and its two peaks."""
    peak = next((r for r in rows if r["kind"] == "peak"), None)
    if peak is None:
        raise SystemExit("no peak row: run `accelerator.py peak` first")
    spec, measured = peak["spec_bf16_flops_per_s"], peak["measured_bf16_flops_per_s"]
    lines = [f"{peak['device_kind']} x{peak['device_count']} ({peak['platform']}, jax {peak['jax']}); bf16 dense peak per device: spec "
             + (f"{spec / 1e12:.0f} TFLOP/s" if spec else "unknown (set ACCEL_SPEC_TFLOPS)")
             + f", measured {peak['matmul_n']}^3 matmul {measured / 1e12:.1f} TFLOP/s", ""]
    cols = ("workload", "devices", "batch/device", "images/s", "tokens/s", "step s", "MFU vs spec peak",
            "MFU vs measured matmul peak", "compile s", "peak memory GiB", "remat", "dtype")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["kind"] == "failed":
            lines.append(f"| {r['workload']} | - | {r['batch_per_device']} | failed: {r['error']} |")
            continue
        if r["kind"] != "workload":
            continue
        achieved, n = r["flops_per_step"] / r["step_s"], r["devices"]
        memory = _gib(r["peak_bytes"]) if r["peak_bytes"] else f"{_gib(r['xla_memory_estimate_bytes'])} (XLA est.)"
        lines.append("| " + " | ".join([
            r["workload"], str(n), f"{r['batch_per_device']:g}", f"{r['images_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['step_s']:.3f}", _pct(achieved / (spec * n) if spec else None), _pct(achieved / (measured * n)),
            f"{r['compile_s']:.1f}", memory, r["remat"], r["compute_dtype"]]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main

def append(path: str, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("peak", "train", "sample", "table"))
    parser.add_argument("rows", nargs="?", help="table: the rows file")
    parser.add_argument("--out", help="the rows file a workload appends to")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch-per-device", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64, help="sample: global batch")
    parser.add_argument("--steps", type=int, default=5, help="timed calls after the warm-up (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "auto"))
    parser.add_argument("--remat", default="none", choices=("none", "block"))
    parser.add_argument("--retry-on-oom", action="store_true",
                        help=f"train: exit with status {OUT_OF_MEMORY} instead of a failed row when out of memory")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--spec-tflops", type=float, default=float(os.environ.get("ACCEL_SPEC_TFLOPS") or 0),
                        help="the device's bf16 dense peak in TFLOP/s (default: by device kind)")
    args = parser.parse_args()

    if args.what == "table":
        print(table([json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]))
        return
    try:
        if args.what == "peak":
            row = peak_row(args.matmul_n, args.spec_tflops or None)
        elif args.what == "train":
            row = train_row(args.depth, args.batch_per_device, args.steps, args.dtype, args.remat)
        else:
            row = sample_row(args.depth, args.batch, args.steps, args.dtype)
    except Exception as e:   # noqa: BLE001 -- one failed workload is a table row, not the end of the run
        if args.what == "train" and args.retry_on_oom and is_out_of_memory(e):
            raise SystemExit(OUT_OF_MEMORY)
        row = {"kind": "failed", "workload": f"{args.what} d{args.depth}",
               "batch_per_device": args.batch_per_device if args.what == "train" else args.batch,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    print(json.dumps(row))
    if args.out:
        append(args.out, row)


if __name__ == "__main__":
    main()
