#!/usr/bin/env bash
# Several hosts as one Ray cluster, one rank per host (tests/test_multihost.py runs these commands on netns hosts).
#
#   head host:     ray start --head --port 6379 [--num-cpus C]
#   every other:   ray start --address HEAD_IP:6379 [--num-cpus C]
#   then, on any node of the cluster:
#                  launch/ray_multinode.sh ENGINE_DIR [tp-run flags...]
#
# Every node needs the same Python environment (pip install 'tp_runtime[ray]') and the engine directory at the
# same path (a shared filesystem, or a copy: each rank reads only its own rank{r}.safetensors).
# With token authentication (RAY_AUTH_MODE=token) every node and driver needs the head's ~/.ray/auth_token.
# --placement spread puts one rank on each node (STRICT_SPREAD) when there are enough nodes, else spreads them as
# Ray can (SPREAD: ranks share nodes); rank 0's actor publishes its node's IP and a free port, so that
# port range must be open between the nodes (gloo's TCP connections). The communicator picks gloo when the ranks
# span hosts (shared memory only within one host). Each rank's bundle gets --threads CPUs (default: the cluster's
# CPUs / tp_size, at most one node's), and its torch thread count follows.
# On GPUs: each rank gets one GPU (bundles {CPU: 1, GPU: 1}); the ranks of a node see that node's GPUs of the
# group, and NCCL carries the all-reduces.
# Through the job server instead: RAY_ADDRESS=http://HEAD_IP:8265 launch/ray_job.sh ENGINE_DIR --placement spread ...
set -euo pipefail
ENGINE=$1; shift
exec tp-run --launcher ray --placement spread --ray_address auto --engine "$ENGINE" "$@"
