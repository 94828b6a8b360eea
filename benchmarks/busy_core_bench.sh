#!/usr/bin/env bash
# `synthmorph-app register` with 2 threads while another process keeps one core busy, as on a
# shared laptop or HPC node, timed by farm-bench against a baseline (benchmarks/README.md,
# "A busy core"). Whole-head T1w (sub-01) onto MNI152NLin6Asym res-02.
#
#   benchmarks/busy_core_bench.sh [RUNS] [BASELINE]
#
# BASELINE: a checkout of the package from before it set OMP_WAIT_POLICY (for example
# `git worktree add /tmp/before afb4c06`), run through PYTHONPATH; without it the baseline runs
# with OMP_WAIT_POLICY=ACTIVE (threads that always spin). BUSY=0 leaves the machine idle.
set -euo pipefail
runs=${1:-3}
baseline=${2:-}
data=${SYNTHMORPH_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
moving=$data/bids/sub-01/anat/sub-01_T1w.nii.gz
fixed=$data/templateflow/tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz
out=$(mktemp -d)
hog=
cleanup() { [ -n "$hog" ] && kill "$hog" 2>/dev/null; rm -rf "$out"; }
trap cleanup EXIT
if [ "${BUSY:-1}" != 0 ]; then
    python -c 'while True: pass' &  # one busy core
    hog=$!
fi
if [ -n "$baseline" ]; then
    b="env PYTHONPATH=$baseline synthmorph-app register -j 2 -o $out/b.nii.gz $moving $fixed"
else
    b="env OMP_WAIT_POLICY=ACTIVE synthmorph-app register -j 2 -o $out/b.nii.gz $moving $fixed"
fi
farm-bench -n "$runs" --warmup 0 --timeout 3000 --vs "$b" -- \
    synthmorph-app register -j 2 -o "$out/a.nii.gz" "$moving" "$fixed"
