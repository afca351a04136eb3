#!/usr/bin/env bash
# Run the multi-host code path on one machine: NUM_PROCESSES CPU processes on localhost, each with
# DEVICES_PER_PROCESS simulated devices, joined through jax.distributed.initialize (coordinator on PORT).
#
#   launch/local_multiprocess.sh --config configs/digits_var.py:depth=2,width=64,batch=8,image_size=16 \
#       --workdir /tmp/var_mp --config.tokenizer_checkpoint=workdirs/digits_tokenizer \
#       --config.patch_nums='(1,2,3,4)' --config.total_steps=4 --config.mesh='(2,2,1)'
#
# Process 0's output is shown; the others' go to WORKDIR-less logs under ${LOG_DIR:-/tmp}/var_jax_process_N.log.
set -euo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-12356}
LOG_DIR=${LOG_DIR:-/tmp}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

pids=()
for ((i = 1; i < NUM_PROCESSES; i++)); do
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
        "$PYTHON" -m var_jax train --coordinator_address "localhost:$PORT" --num_processes "$NUM_PROCESSES" \
        --process_id "$i" "$@" > "$LOG_DIR/var_jax_process_$i.log" 2>&1 &
    pids+=($!)
done
status=0
JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -m var_jax train --coordinator_address "localhost:$PORT" --num_processes "$NUM_PROCESSES" \
    --process_id 0 "$@" || status=$?
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit $status
