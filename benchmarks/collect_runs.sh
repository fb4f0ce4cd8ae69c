#!/usr/bin/env bash
# Copy the records of fine-tuning runs into the repository: every results.json, plot and table under
# SRC (an --output-dir of gmoe-finetune), without the adapters and Trainer folders (large, reproducible).
#   bash benchmarks/collect_runs.sh outputs/study benchmarks/results/routing-study
set -euo pipefail
src=${1:?source output dir}; dst=${2:?destination}
cd "$src"
find . \( -name adapter -o -name trainer -o -name '.*' ! -name . \) -prune -o -type f \
    \( -name '*.json' -o -name '*.png' -o -name '*.md' \) -print |
while read -r f; do
    mkdir -p "$OLDPWD/$dst/$(dirname "$f")"
    cp "$f" "$OLDPWD/$dst/$f"
done
