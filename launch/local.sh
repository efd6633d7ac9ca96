#!/usr/bin/env bash
# Local training + a second process evaluating each new checkpoint as it is written.
#   launch/local.sh CONFIG WORKDIR [--config.key=value ...]
# Example: launch/local.sh configs/demo.py:loss=focal workdir/demo --config.loss.gamma=3
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
wikitopics=${WIKITOPICS:-wikitopics}
mkdir -p "$workdir"
# The evaluator polls for checkpoints; it stops once the training job has written results.json.
"$wikitopics" evaluate --workdir="$workdir" --split=val --watch --poll_seconds=30 \
    >"$workdir/eval_watch.log" 2>&1 &
watcher=$!
trap 'kill $watcher 2>/dev/null || true' EXIT
"$wikitopics" train --config="$config" --workdir="$workdir" "$@"
wait $watcher || true
