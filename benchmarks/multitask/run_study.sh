#!/usr/bin/env bash
# The multi-task study (docs/routing.md), resumable: every finished run is skipped, so rerun it after a
# crash, a stop or a preemption. Several copies may run at once on one output folder (one thread each:
# OMP_NUM_THREADS=1, one copy per core); the job's run locks give each (method, seed) to one of them.
#   OMP_NUM_THREADS=1 bash benchmarks/multitask/run_study.sh outputs/multitask-study
# Then: bash benchmarks/collect_runs.sh outputs/multitask-study benchmarks/results/multitask-study
set -uo pipefail
out=${1:-outputs/multitask-study}
python=${PYTHON:-python}
# 1. the tasks, from zero-shot and single-task evidence only (the rule: benchmarks/multitask/select_tasks.py)
"$python" -m benchmarks.multitask.select_tasks --output-dir "$out" || exit
tasks=$("$python" -c "import json; print(','.join(json.load(open('benchmarks/results/multitask-study/task-selection.json'))['tasks']))") || exit
# 2. every method, 3 seeds, on the mixture; a method this version does not have yet is left for a later run
methods=$("$python" -c "
from gmoe.finetune.methods import METHODS
from benchmarks.multitask.select_tasks import STUDY_METHODS
print(','.join(m for m in STUDY_METHODS if m in METHODS))") || exit
echo "tasks: $tasks; methods: $methods"
# --save-steps: a run stopped when the machine goes away resumes from its last checkpoint (not part of the budget)
"$python" -m gmoe.finetune compare --config benchmarks/multitask/study.yaml --task "$tasks" --methods "$methods" \
    --save-steps 20 --output-dir "$out"
rc=$?
[ $rc -eq 0 ] || [ $rc -eq 3 ] || exit $rc   # 3: some runs are held by another copy; they finish there
