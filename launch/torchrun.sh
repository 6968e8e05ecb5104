#!/usr/bin/env bash
# The same engine under torchrun: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from torchrun.
# Usage: launch/torchrun.sh ENGINE_DIR [tp-run flags...]
set -euo pipefail
ENGINE=$1; shift
N=$(python -c "import json,sys; print(json.load(open(sys.argv[1] + '/config.json'))['mapping']['tp_size'])" "$ENGINE")
exec torchrun --nproc_per_node "$N" "$(command -v tp-run)" --engine "$ENGINE" "$@"
