#!/usr/bin/env bash
# tp-run as a Ray job: `ray job submit` runs the driver on the cluster, the driver places one actor per rank
# (a placement group: --placement pack = one node, spread = across nodes) and rank 0's output comes back here.
# Usage: launch/ray_job.sh ENGINE_DIR [tp-run flags...]     e.g. launch/ray_job.sh /data/engines/x --input_text "Hi"
#   RAY_ADDRESS      the cluster's job server (default http://127.0.0.1:8265, the dashboard of `ray start --head`)
#   WORKING_DIR      uploaded to the cluster and put on the driver's and the actors' path (default: this repository),
#                    so the cluster needs tp_runtime's dependencies (torch, safetensors, transformers) but not
#                    tp_runtime itself. The engine is not uploaded: give a path every node can read.
# A cluster with token authentication (Ray's default for `ray start`) wants the client to send its token:
#   export RAY_AUTH_MODE=token   (the token is read from ~/.ray/auth_token, or RAY_AUTH_TOKEN)
# Tried on one host: ray start --head --num-cpus 2 --dashboard-port 8275 --block, then this script with
# RAY_ADDRESS=http://127.0.0.1:8275 ran a tp=2 engine in about 12 s (submission to the job's end).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
ENGINE=$1; shift
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
exec ray job submit --working-dir "${WORKING_DIR:-$HERE}" \
    --runtime-env-json '{"excludes": [".git", ".venv", "engines", "benchmarks/results", "*.safetensors"]}' \
    -- python -m tp_runtime.cli.run --launcher ray --ray_address auto --engine "$ENGINE" "$@"
