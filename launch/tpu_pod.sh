#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker runs the same command; JAX discovers the pod.
#
#   PROJECT=my-project ZONE=us-central2-b TPU=wikitopics-v4-32 ACCELERATOR=v4-32 \
#   BUCKET=gs://my-bucket launch/tpu_pod.sh create|install|train|status|delete [--config.key=value ...]
#
# create:  a TPU VM slice (spot: preemptible; the trainer saves on SIGTERM and resumes on restart).
# install: copies this checkout to every worker and installs it with JAX for TPU.
# install: also mounts the bucket with gcsfuse at /mnt/bucket on every worker: our manifests,
#          metrics and reports use ordinary file I/O, so data and workdir live on that mount.
# train:   runs `wikitopics train --distributed` on all workers.
# Restarting `train` after a preemption continues from the last checkpoint in the workdir.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU:?}" "${BUCKET:?}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/thesis_b2_64.py}
MOUNT=/mnt/bucket
DATA=${DATA:-$MOUNT/data/wit_64px}
WORKDIR=${WORKDIR:-$MOUNT/workdirs/$(basename "$CONFIG" .py)}
action=${1:?create|install|train|status|delete}; shift || true
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --project="$PROJECT" --zone="$ZONE" --worker=all --command="$1"; }

case "$action" in
  create)
    gcloud compute tpus tpu-vm create "$TPU" --project="$PROJECT" --zone="$ZONE" \
        --accelerator-type="$ACCELERATOR" --version="$RUNTIME" --spot ;;
  install)
    tar czf /tmp/wikitopics_jax.tgz --exclude=.venv --exclude=workdir --exclude=data --exclude=.git .
    gcloud compute tpus tpu-vm scp /tmp/wikitopics_jax.tgz "$TPU":~/ --project="$PROJECT" \
        --zone="$ZONE" --worker=all
    ssh_all "mkdir -p ~/wikitopics_jax && tar xzf ~/wikitopics_jax.tgz -C ~/wikitopics_jax && \
        cd ~/wikitopics_jax && python3 -m venv .venv && .venv/bin/pip install -q -e . && \
        .venv/bin/pip install -q 'jax[tpu]==0.10.2' && \
        sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && \
        (mountpoint -q $MOUNT || gcsfuse --implicit-dirs ${BUCKET#gs://} $MOUNT)" ;;
  train)
    ssh_all "cd ~/wikitopics_jax && .venv/bin/wikitopics train --distributed \
        --config=$CONFIG --workdir=$WORKDIR --config.data.dir=$DATA --config.data.generate_synthetic=False \
        --config.data.worker_count=8 $* 2>&1 | tee -a ~/train.log" ;;
  status)
    ssh_all "tail -n 3 ~/train.log" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU" --project="$PROJECT" --zone="$ZONE" --quiet ;;
  *) echo "unknown action $action" >&2; exit 2 ;;
esac
