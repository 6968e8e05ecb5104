#!/usr/bin/env bash
# One host, N ranks under MPICH's mpirun (from the PyPI package mpich, installed by the `mpi` extra).
# Usage: launch/mpirun.sh ENGINE_DIR [tp-run flags...]   e.g. launch/mpirun.sh engines/x --input_text "Hi"
# The number of ranks is read from the engine's config.json (mapping.tp_size).
# Open MPI instead: mpirun --allow-run-as-root -n N tp-run ...  (it refuses root without that flag)
set -euo pipefail
ENGINE=$1; shift
N=$(python -c "import json,sys; print(json.load(open(sys.argv[1] + '/config.json'))['mapping']['tp_size'])" "$ENGINE")
exec mpirun -n "$N" tp-run --engine "$ENGINE" "$@"
