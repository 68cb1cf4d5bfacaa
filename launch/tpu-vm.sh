#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (or several slices). Every worker runs the same command;
# JAX finds its peers from the TPU metadata (the trainer logs "distributed runtime: Cloud TPU").
#
#   launch/tpu-vm.sh create    # a single slice (or SLICES>1: a multi-slice queued resource)
#   launch/tpu-vm.sh setup     # copy this repository and the data to every worker, install
#   launch/tpu-vm.sh train     # start (or resume: same command) on all workers, in the background
#   launch/tpu-vm.sh logs      # follow process 0's log
#   launch/tpu-vm.sh delete
#
# Meant for: configs/v4-flash-pod.yaml (v4-flash, mesh fsdp=-1 x expert=16, bfloat16, full remat)
# on ACCELERATOR=v5p-512 (256 chips). Check the fit first:
#   python -m plan --config configs/v4-flash-pod.yaml --topology v5p-512
# Preemption: the TPU runtime sends SIGTERM; all workers agree on a step, save it and exit 0.
# Resume by running `train` again (after `create` for a reclaimed spot / queued slice).
# Where things go: checkpoints in CKPT_DIR (gs://, written by Orbax from every worker);
# metrics, config.yaml and the log in ~/deepflax/$RUN_DIR on worker 0.
set -euo pipefail
TPU_NAME=${TPU_NAME:-deepflax}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-512}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
SLICES=${SLICES:-1}                      # >1: multi-slice; set mesh.dcn_data=$SLICES in the config
CONFIG=${CONFIG:-configs/v4-flash-pod.yaml}
RUN_DIR=${RUN_DIR:-runs/v4-flash}
CKPT_DIR=${CKPT_DIR:?set CKPT_DIR=gs://your-bucket/v4-flash/checkpoints}
EXTRA=${EXTRA:-}                         # more key=value overrides
REPO=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

case "${1:-}" in
  create)
    if [ "$SLICES" -gt 1 ]; then
      gcloud compute tpus queued-resources create "$TPU_NAME" --zone "$ZONE" \
        --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" \
        --node-count "$SLICES" --node-prefix "$TPU_NAME"
    else
      gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
        --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
    fi ;;
  setup)
    gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all "$REPO" "$TPU_NAME":~/deepflax
    ssh_all "cd ~/deepflax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'" ;;
  train)
    ssh_all "cd ~/deepflax && mkdir -p $RUN_DIR && nohup .venv/bin/python -m train --config $CONFIG \
      log.run_dir=$RUN_DIR checkpoint.dir=$CKPT_DIR train.devices=null $EXTRA \
      > $RUN_DIR/train.\$(hostname).log 2>&1 &" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
      --command "tail -f ~/deepflax/$RUN_DIR/train.*.log" ;;
  delete)
    if [ "$SLICES" -gt 1 ]; then
      gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --force
    else
      gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE"
    fi ;;
  *) sed -n 2,21p "$0"; exit 2 ;;
esac
