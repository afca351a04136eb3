#!/usr/bin/env bash
# VAR on one accelerator machine (GPU or TPU): the train step at d16/d20/d24/d30 in bfloat16 with the reference
# batch per device, and d16 sampling at batch 64 (cfg 1.5, top-k 900, top-p 0.96, with decode); one table with
# images/s, tokens/s, step time, MFU against the device's spec bf16 peak and against a measured bf16 matmul
# peak, compile time and peak memory. Each workload runs in its own process (benchmarks/accelerator.py), so
# that the device's peak memory is that workload's.
#
#   bash benchmarks/accelerator.sh                      # on the accelerator machine
#   ACCEL_SMOKE=1 bash benchmarks/accelerator.sh        # CPU smoke check: d2/d4, batch 2, a few minutes
#
# Settings (environment, all optional):
#   ACCEL_DEPTHS        train depths, space-separated            (16 20 24 30)
#   ACCEL_BATCH         batch per device for every train depth   (the reference's, see reference_batch)
#   ACCEL_SAMPLE_DEPTH  ACCEL_SAMPLE_BATCH                        (16, 64)
#   ACCEL_STEPS         timed calls per workload, median          (5)
#   ACCEL_DTYPE         compute dtype                             (bfloat16)
#   ACCEL_REMAT         auto: none, again with block when out of memory | none | block   (auto)
#   ACCEL_SPEC_TFLOPS   bf16 dense peak per device in TFLOP/s     (by device kind, accelerator.py SPEC_BF16_TFLOPS)
#   ACCEL_OUT           the JSON-lines file of the rows           (a new temporary file)
#   PYTHON              the interpreter                           (python)
set -euo pipefail
cd "$(dirname "$0")/.."

# The reference batch per device: the global batch of VAR's released recipes (--bs 768 for d16/d20/d24, 1024 for
# d30: the VAR README's training scripts, ../shared/docs/VAR_REFERENCE.md §4) over the 16 A100s (two nodes of
# --nproc_per_node=8) that d16 was trained on (VAR_REFERENCE.md §4; the README leaves --nnodes open for the other
# depths, so 16 GPUs is assumed for them too).
reference_batch() { case "$1" in 30) echo 64 ;; *) echo 48 ;; esac; }

if [[ -n "${ACCEL_SMOKE:-}" ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  depths="${ACCEL_DEPTHS:-2 4}" batch="${ACCEL_BATCH:-2}" sample_depth="${ACCEL_SAMPLE_DEPTH:-2}"
  sample_batch="${ACCEL_SAMPLE_BATCH:-2}" steps="${ACCEL_STEPS:-1}" matmul_n=512
else
  depths="${ACCEL_DEPTHS:-16 20 24 30}" batch="${ACCEL_BATCH:-}" sample_depth="${ACCEL_SAMPLE_DEPTH:-16}"
  sample_batch="${ACCEL_SAMPLE_BATCH:-64}" steps="${ACCEL_STEPS:-5}" matmul_n=8192
fi
dtype="${ACCEL_DTYPE:-bfloat16}" remat="${ACCEL_REMAT:-auto}" python="${PYTHON:-python}"
out="${ACCEL_OUT:-$(mktemp "${TMPDIR:-/tmp}/accelerator.XXXXXX.jsonl")}"

bench() { "$python" benchmarks/accelerator.py "$@" --out "$out" --dtype "$dtype" --steps "$steps"; }

# A process that dies without writing its row (a crash, not an exception) still gets one.
failed() { printf '{"kind": "failed", "workload": "%s", "batch_per_device": %s, "error": "exit status %s"}\n' \
  "$1" "$2" "$3" >> "$out"; }

bench peak --matmul-n "$matmul_n"
for depth in $depths; do
  per_device="${batch:-$(reference_batch "$depth")}"
  status=0
  if [[ "$remat" == auto ]]; then
    bench train --depth "$depth" --batch-per-device "$per_device" --remat none --retry-on-oom || status=$?
    if [[ $status == 75 ]]; then   # accelerator.OUT_OF_MEMORY
      echo "train d$depth: out of memory without remat, again with remat block" >&2
      status=0
      bench train --depth "$depth" --batch-per-device "$per_device" --remat block || status=$?
    fi
  else
    bench train --depth "$depth" --batch-per-device "$per_device" --remat "$remat" || status=$?
  fi
  [[ $status == 0 ]] || failed "train d$depth" "$per_device" "$status"
done
status=0
bench sample --depth "$sample_depth" --batch "$sample_batch" || status=$?
[[ $status == 0 ]] || failed "sample d$sample_depth" "$sample_batch" "$status"

echo
"$python" benchmarks/accelerator.py table "$out"
echo
echo "rows: $out"
