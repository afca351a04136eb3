#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice, or of several slices (multi-slice): one process per TPU VM host,
# started over ssh on every worker. JAX finds the other hosts itself (`--distributed` ->
# jax.distributed.initialize()).
#
# One slice (a TPU VM named TPU_NAME):
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config configs/imagenet_var.py:depth=16 --workdir gs://my-bucket/var_d16 \
#       --config.tokenizer_checkpoint=gs://my-bucket/vae_ch160v4096z32 --config.data.name=tfds \
#       --config.data.tfds_name=imagenet2012 --config.data.data_dir=gs://my-bucket/tfds
#
# Several slices joined by the data-centre network: only a queued resource with --node-count N makes them (the
# TPU runtime then sets the MEGASCALE_* variables that join the slices; nothing to pass by hand). Create it once:
#   gcloud compute tpus queued-resources create my-qr --zone us-east5-a --accelerator-type v5p-64 \
#       --runtime-version v2-alpha-tpuv5 --node-count 2 --node-prefix my-qr
# then run on every worker of every slice, with the data axis across the slices (mesh_dcn = (N, 1, 1); `mesh`
# is then the layout within one slice):
#   QUEUED_RESOURCE=my-qr ZONE=us-east5-a launch/tpu_pod.sh \
#       --config configs/imagenet_var.py:depth=30,slices=2,fsdp=32 --workdir gs://my-bucket/var_d30 ...
#   (or, with any config: --config.mesh_dcn=2,1,1)
#
# Environment: ZONE (required); TPU_NAME (one slice) or QUEUED_RESOURCE (several); PROJECT (optional); REPO_DIR
# (the var-jax checkout on every host, default ~/var-jax); PYTHON (default python3). The workdir must be shared by
# all hosts (a GCS bucket). Rerunning the same command resumes from the latest checkpoint.
set -euo pipefail
: "${ZONE:?set ZONE to the TPU zone}"
if [[ -z "${TPU_NAME:-}" && -z "${QUEUED_RESOURCE:-}" ]]; then
    echo "set TPU_NAME (one slice) or QUEUED_RESOURCE (several slices)" >&2
    exit 2
fi
REPO_DIR=${REPO_DIR:-'~/var-jax'}
PYTHON=${PYTHON:-python3}
ARGS=$(printf '%q ' "$@")
COMMAND="cd $REPO_DIR && $PYTHON -m var_jax train --distributed $ARGS"

if [[ -n "${QUEUED_RESOURCE:-}" ]]; then
    gcloud compute tpus queued-resources ssh "$QUEUED_RESOURCE" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
        --node=all --worker=all --command "$COMMAND"
else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
        --command "$COMMAND"
fi
