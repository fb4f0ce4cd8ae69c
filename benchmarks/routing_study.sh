#!/usr/bin/env bash
# The routing study (docs/routing.md), resumable: every finished run is skipped, so rerun it after a
# crash or a stop. Several copies may run at once on one output folder (one per core here: each run
# takes one thread); the job's run locks give each (task, method, seed) to exactly one of them, and a
# copy moves on past a run another one holds.
#   OMP_NUM_THREADS=1 bash benchmarks/routing_study.sh outputs/study
# Then: bash benchmarks/collect_runs.sh outputs/study benchmarks/results/routing-study
#       python -m benchmarks.routing_study
set -uo pipefail   # not -e: a compare that skipped runs held by another copy exits 3
out=${1:-outputs/study}
finetune="${PYTHON:-python} -m gmoe.finetune compare --preset study --output-dir $out"
# The accuracy methods: the baselines, the paper's method, and the options that helped in the routing runs together.
accuracy=lora,mixlora,gmoe,gmoe-balanced
# Routing runs (seed 0): every option alone and the linear router with the GMoE losses.
$finetune --task siqa --seeds 1 --methods gmoe,mixlora,lora,gmoe-window,gmoe-frozen,gmoe-uniform,gmoe-no-graph,gmoe-balanced
for task in siqa piqa; do
    $finetune --task $task --seeds 3 --methods $accuracy
done
