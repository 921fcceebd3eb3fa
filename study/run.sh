#!/usr/bin/env bash
# The packaged-model study in docs/study/: SmolLM2-135M-Instruct and Gemma-3-270M on the paper's TRACE data,
# both task orders, seed 33 (SEEDS=33,42 adds a second), at sizes that fit a 2-core CPU. Rerunning resumes
# unfinished runs.
#   study/run.sh            # all runs, then the report and the position comparison
# Needs `make venv gemma` and `lorawatch data fetch trace-500` (add --source DIR for a local copy).
set -euo pipefail
cd "$(dirname "$0")/.."
LW=.venv/bin/lorawatch
OUT=${STUDY_RUNS:-runs/study}
SEEDS=${SEEDS:-33}
SMOL="--max-train-rows 96 --max-test-rows 40 --max-new-tokens 64 --seeds $SEEDS"
GEMMA="--max-train-rows 96 --max-test-rows 40 --max-new-tokens 32 --seeds $SEEDS"
for order in original reversed; do
  $LW run --preset paper-qwen --model smollm2-135m-instruct --dtype float32 --order $order $SMOL \
      --out "$OUT/smollm2-$order"
done
for order in original reversed; do
  $LW run --preset paper-gemma --model gemma3-270m --dtype float32 --order $order $GEMMA \
      --out "$OUT/gemma3-$order"
done
$LW report "$OUT"/smollm2-original "$OUT"/smollm2-reversed "$OUT"/gemma3-original "$OUT"/gemma3-reversed \
    --out docs/study --html   # report.md and the tables; report.html: the same in one offline page
.venv/bin/python study/positions.py "$OUT"/smollm2-original "$OUT"/smollm2-reversed "$OUT"/gemma3-original \
    "$OUT"/gemma3-reversed --out docs/study/positions
.venv/bin/python study/summarize.py docs/study   # the numbers docs/study/README.md quotes
