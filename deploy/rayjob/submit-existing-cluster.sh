#!/usr/bin/env bash
# Submit an osfn-dist training run to a Ray cluster that already runs: a KubeRay RayCluster, a VM
# cluster from `ray up`, or a local `ray start --head`. Every node must run the osfn-dist image
# (docker/Dockerfile) or otherwise have the package installed: the train loop is imported on the
# workers.
#
#   1. Reach the cluster's job API (port 8265). With KubeRay:
#        kubectl port-forward svc/<raycluster>-head-svc 8265:8265
#   2. Authenticate. Ray 2.60 switches token auth on by default, and the ray CLI must use the
#      same mode as the cluster (RAY_AUTH_MODE):
#        export RAY_AUTH_MODE=token
#        export RAY_AUTH_TOKEN=$(kubectl get secret <secret> -o jsonpath='{.data.auth_token}' | base64 -d)
#      (<secret>: the one KubeRay created for the RayCluster with authOptions.mode=token, or your
#      own authOptions.secretName), or, for a cluster started without auth:
#        export RAY_AUTH_MODE=disabled
#   3. Submit:
#        deploy/rayjob/submit-existing-cluster.sh                       # defaults below
#        NUM_WORKERS=8 USE_GPU=1 STEPS=5000 deploy/rayjob/submit-existing-cluster.sh
#        OSFN_CONFIG=my-train.yaml deploy/rayjob/submit-existing-cluster.sh --seed 3
#      Extra arguments go to `osfn-dist train` as they are.
#
# Settings (environment):
#   RAY_ADDRESS     job API address (default http://127.0.0.1:8265)
#   WORKLOAD        built-in workload or package.module:function (default mnist1d_mlp)
#   STEPS           training steps (default: the workload's)
#   NUM_WORKERS     Ray Train workers (default 2)
#   USE_GPU=1       one GPU per worker, NCCL
#   OSFN_CONFIG     a local train config YAML; uploaded with the job (its working dir) and passed
#                   as --config (flags above still override it)
#   RUN_DIR         run directory on the cluster; shared storage when workers span nodes
#   NO_WAIT=1       return after submitting instead of streaming the logs
#   DRY_RUN=1       print the command instead of running it
set -euo pipefail

RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
WORKLOAD=${WORKLOAD:-mnist1d_mlp}
NUM_WORKERS=${NUM_WORKERS:-2}

if [ -z "${RAY_AUTH_MODE:-}" ]; then
  echo "note: RAY_AUTH_MODE is not set; Ray 2.60 then assumes token auth (see the header of $0)" >&2
fi

# Inside the job, `--address auto` joins the cluster the job was submitted to.
train=(osfn-dist train --workload "$WORKLOAD" --num-workers "$NUM_WORKERS" --address auto --no-progress)
[ -n "${STEPS:-}" ] && train+=(--steps "$STEPS")
[ "${USE_GPU:-0}" = 1 ] && train+=(--use-gpu)
[ -n "${RUN_DIR:-}" ] && train+=(--run-dir "$RUN_DIR")

submit=(ray job submit --address "$RAY_ADDRESS"
        --submission-id "osfn-$(date +%Y%m%d-%H%M%S)"
        # ray.train.report() waits ~RAY_TRAIN_HEALTH_CHECK_INTERVAL_S per call (Ray's default 2 s).
        --runtime-env-json "{\"env_vars\": {\"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S\": \"${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}\"}}")
if [ -n "${OSFN_CONFIG:-}" ]; then
  [ -f "$OSFN_CONFIG" ] || { echo "OSFN_CONFIG=$OSFN_CONFIG: no such file" >&2; exit 2; }
  # The working dir is uploaded to the cluster and is the job's current directory there.
  workdir=$(mktemp -d)
  trap 'rm -rf "$workdir"' EXIT
  cp "$OSFN_CONFIG" "$workdir/train.yaml"
  submit+=(--working-dir "$workdir")
  train+=(--config train.yaml)
fi
[ "${NO_WAIT:-0}" = 1 ] && submit+=(--no-wait)

cmd=("${submit[@]}" -- "${train[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
"${cmd[@]}"
