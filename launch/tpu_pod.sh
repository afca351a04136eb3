#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice: one process per TPU VM host, started over `gcloud ... ssh
# --worker=all`. JAX finds the other hosts itself (`--distributed` -> jax.distributed.initialize()).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config configs/imagenet_var.py:depth=16 --workdir gs://my-bucket/var_d16 \
#       --config.tokenizer_checkpoint=gs://my-bucket/vae_ch160v4096z32 --config.data.name=tfds \
#       --config.data.tfds_name=imagenet2012 --config.data.data_dir=gs://my-bucket/tfds
#
# Environment: TPU_NAME, ZONE (required); PROJECT (optional); REPO_DIR (the var-jax checkout on every host,
# default ~/var-jax); PYTHON (default python3). The workdir must be shared by all hosts (a GCS bucket).
# Rerunning the same command resumes from the latest checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR=${REPO_DIR:-'~/var-jax'}
PYTHON=${PYTHON:-python3}
ARGS=$(printf '%q ' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
    --command "cd $REPO_DIR && $PYTHON -m var_jax train --distributed $ARGS"
