#!/usr/bin/env bash
# The CUDA checks of one GPU lease, as one command (the GPU machine has no network and none of
# our neuroimaging dependencies: run `python benchmarks/gpu_prepare.py` here first, then this
# there with `.gpu` carried). Each stage has its own time limit and the next one runs whatever
# the last gave; everything goes to $OUT:
#   gpu_check.log        all output (CUDA tests, demo, benchmark tables, training log lines)
#   template_bench.json  bert -> fsaverage, joint with the default refinement, on CUDA
#   training.tar.gz      the training burst: train_log.csv, validation.csv, exports, config
#   profile_register.txt torch operators of bert -> fsaverage (STAGES=profile)
# A dry run here, on the CPU: DEVICE=cpu SCALE=0.2 OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1}  # multiplies the time limits of the long stages (a short dry run: 0.2)
STAGES=${STAGES:-tests demo template register official bids train}  # which stages run
# (also: profile, where the time of bert -> fsaverage goes by torch operator; share, 12
# registrations with 1, 2 or 4 at a time on the device)
BUDGET=${BUDGET:-540}  # seconds for the whole script: the training burst gets what is left
START=$(date +%s)
mkdir -p "$OUT"
REPO=$(pwd)
WORK=$(mktemp -d)
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
secs() { python3 -c "print(max(5, int($1 * $SCALE)))"; }
stage() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

if [ -f .gpu/site.tar.gz ] && ! python3 -c 'import nipype' 2>/dev/null; then
    tar xzf .gpu/site.tar.gz -C "$WORK"
    export PYTHONPATH=$REPO:$WORK/site
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec python3 -m synthmorph_app "$@"\n' > "$WORK/bin/synthmorph-app"
chmod +x "$WORK/bin/synthmorph-app"
export PATH=$WORK/bin:$PATH PYTHONUNBUFFERED=1 NIPYPE_NO_ET=1
export SYNTHMORPH_SHARED_DATA=${SYNTHMORPH_SHARED_DATA:-$REPO/.gpu/data}
export TEMPLATEFLOW_HOME=$WORK/templateflow
cp -r "$SYNTHMORPH_SHARED_DATA/templateflow" "$TEMPLATEFLOW_HOME"

stage environment
nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'
python3 -c 'import sys, torch, nibabel, nipype, bids, voxelmorph; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'

if want tests; then
stage 'CUDA tests (they skip without CUDA)'
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts='' -rs \
    tests/test_spatial.py tests/test_optimise.py tests/test_synthesis.py tests/test_workflows.py \
    tests/test_register.py tests/test_bids_app.py \
    -k 'cuda or gpu'
fi

if want demo; then
stage "the BIDS-App's demo with --device $DEVICE"
timeout "$(secs 90)" synthmorph-app demo "$WORK/demo" --device "$DEVICE" -w "$WORK/demo_work"
echo "demo exit code $?"
find "$WORK/demo" -name '*.h5' -o -name '*.html' | sort | sed "s|$WORK/||"
fi

if want template; then
stage "bert -> fsaverage, joint, default refinement, on $DEVICE"
timeout "$(secs 100)" python3 benchmarks/template_bench.py --pairs fsaverage \
    --methods none ours-joint --threads 16 --ours-options="$([ "$DEVICE" = cuda ] && echo -g)" \
    --json "$OUT/template_bench.json"
fi

if want register; then
stage "register timing (benchmarks/bench_register.py), $DEVICE"
for refine in 0 15; do
    timeout "$(secs 60)" python3 benchmarks/bench_register.py --device "$DEVICE" --threads 16 \
        --refine $refine --repeat 2
done
fi
if want official; then
stage "official SynthMorph model sizes (random weights, deform at 1 mm), $DEVICE"
timeout "$(secs 60)" python3 benchmarks/bench_register.py --device "$DEVICE" --threads 16 \
    --official --repeat 1
fi

if want profile; then
stage "profile of bert -> fsaverage on $DEVICE (benchmarks/profile_register.py)"
timeout "$(secs 120)" python3 benchmarks/profile_register.py --device "$DEVICE" --threads 16 \
    > "$OUT/profile_register.txt" 2>&1
echo "exit code $?"; head -n 60 "$OUT/profile_register.txt"
fi

if want share; then
stage "registrations sharing the $DEVICE (benchmarks/gpu_share_bench.py)"
timeout "$(secs 240)" python3 benchmarks/gpu_share_bench.py --device "$DEVICE" --jobs 1 2 4
fi

if want bids; then
stage "the BIDS-App on the T1w images of bids/ (12 subjects): --device $DEVICE, then cpu"
for dev in "$DEVICE" cpu; do
    start=$(date +%s)
    limit=$([ "$dev" = cpu ] && secs 120 || secs 150)
    timeout "$limit" synthmorph-app "$SYNTHMORPH_SHARED_DATA/bids" "$WORK/bids_$dev" \
        participant --contrasts T1w --device "$dev" -w "$WORK/bids_work_$dev" --no-figures
    echo "BIDS-App --device $dev: exit code $?, $(( $(date +%s) - start )) s wall," \
        "$(find "$WORK/bids_$dev" -name '*_xfm.h5' | wc -l) transforms"
done
fi

if want train; then
stage "training on $DEVICE: the joint task from the packaged networks"
MAPS=$SYNTHMORPH_SHARED_DATA/label_maps
CFG='{"symmetric": false, "overlap": "dice", "overlap_weight": 1, "loss_grid": "full",
      "validation_pairs": 16, "synthesis": {"head_size": [0.65, 1.1]}}'
common=(--label-maps "$MAPS" --steps 100000 --voxel-size 4 --shape 64 --seed 0
        --init-affine affine --init-deform deform --device "$DEVICE" --config "$CFG")
echo '--- batch 1 (speed only)'
timeout -s INT "$(secs 30)" synthmorph-app train joint "${common[@]}" --out "$WORK/joint-b1" \
    --lr 5e-5 --checkpoint-every 0 --validate-every 0 --ema 0.999 -v 2>&1 | tail -n 3
python3 benchmarks/gpu_train_summary.py "$WORK/joint-b1"
echo '--- batch 8 (a fine-tuning burst, validated every 200 steps)'
left=$((START + BUDGET - $(date +%s) - 30))
[ "$left" -gt 150 ] && left=150
echo "(${left} s)"
[ "$left" -gt 20 ] && timeout -s INT "$left" synthmorph-app train joint "${common[@]}" --out "$WORK/joint-b8" \
    --batch-size 8 --lr 5e-5 --checkpoint-every 200 --validate-every 200 --ema 0.995 -v \
    2>&1 | grep -iE 'validation|resumed|error|interrupt' | tail -n 20
python3 benchmarks/gpu_train_summary.py "$WORK/joint-b8"
(cd "$WORK" && tar czf "$OUT/training.tar.gz" --exclude='checkpoint.pt' --exclude='tensorboard' \
    joint-b1 joint-b8)
fi
stage done
