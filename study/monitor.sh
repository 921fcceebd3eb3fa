#!/usr/bin/env bash
# The monitored vs unmonitored comparison in docs/monitoring.md: the demo preset (SmolLM2-135M-Instruct, the
# built-in tasks, learning rate 5e-4: a setting whose last stage drifts far from the base model), seed 33,
# without a monitor and with each intervening action at KL 0.5, measured every 2 optimizer steps.
set -euo pipefail
cd "$(dirname "$0")/.."
LW=.venv/bin/lorawatch
OUT=${MONITOR_RUNS:-runs/monitor}
$LW run --preset demo --seeds 33 --out "$OUT/none"
for action in stop revert rollback; do
  $LW run --preset demo --seeds 33 --monitor $action --monitor-threshold 0.5 --monitor-every 2 \
      --out "$OUT/$action"
done
$LW compare "$OUT/none" "$OUT/stop" "$OUT/revert" "$OUT/rollback" --out docs/monitoring
