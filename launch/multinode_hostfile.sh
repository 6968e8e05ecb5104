#!/usr/bin/env bash
# Several hosts under MPICH (tests/test_multihost.py runs its mpirun on the hosts of netns_hosts.sh, netns-rsh as ssh).
# Every host needs the same Python environment and the engine directory at the same path
# (a shared filesystem, or a copy: each rank reads only its own rank{r}.safetensors).
#
#   hosts.txt:   node-a:1
#                node-b:1
#
# The ranks agree on rank 0's address over MPI (mpi4py); set MASTER_ADDR/MASTER_PORT yourself
# only if mpi4py is not installed. On CPU, give each rank the cores of its host with --threads.
# Usage: launch/multinode_hostfile.sh hosts.txt ENGINE_DIR [tp-run flags...]
set -euo pipefail
HOSTS=$1; ENGINE=$2; shift 2
N=$(python -c "import json,sys; print(json.load(open(sys.argv[1] + '/config.json'))['mapping']['tp_size'])" "$ENGINE")
exec mpirun -f "$HOSTS" -n "$N" -ppn 1 tp-run --engine "$ENGINE" "$@"
