#!/usr/bin/env bash
# A deployment build step: compile, gate on accuracy, keep the manifest. Exit codes: 0 ok,
# 2 bad input (model, target, pipeline), 1 internal error. No prompts, no network, deterministic.
set -euo pipefail
MODEL=${1:-minilm}
OUT=${2:-build/$MODEL-arm64}
tcc -q compile "$MODEL" --target arm64 --seq-len 128 \
    --pipeline 'fold-constants,quantize-weights(bits=8)' -o "$OUT" --report "$OUT.report.json" --json
# accuracy gate: embedding cosine vs the original model on held-out text must stay >= 0.99
tcc -q eval "$OUT" --text ../shared/data/wikitext-2/test.txt --max-samples 32 --json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r); sys.exit(0 if r["value"] >= 0.99 else 3)'
