#!/usr/bin/env bash
# Every real-image figure that docs/model_cards.md quotes for the packaged networks, rerun on the
# packaged files (run it after replacing a model in synthmorph_app/data/weights/).
#   bash benchmarks/model_card_figures.sh TAG      # writes benchmarks/results/*_TAG.json
# About 65 minutes on one CPU core (greedy runs side by side on the T1w pairs for time ratios).
# The two halves (the networks alone, the defaults) may run at once: `--part networks` and
# `--part defaults` (greedy's time ratios are then taken beside the other half).
set -euo pipefail
tag=${1:?usage: model_card_figures.sh TAG [--part networks|defaults] (TAG: suffix of the result files, e.g. s9)}
part=all
if [ "${2:-}" = --part ]; then part=${3:?--part takes networks or defaults}; fi
case $part in all|networks|defaults) ;; *) echo "unknown part: $part" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
R=benchmarks/results
F=benchmarks/figures
set -x
if [ "$part" != defaults ]; then
# the networks alone (--refine 0): 12 cross-subject T1w pairs, bert to the templates, lambda
SYNTHMORPH_REFINE=0 python benchmarks/refine_bench.py --pairs 12 --no-ours --no-greedy --none \
    --register --register-mode affine --json "$R/refine_bench_affine_network_$tag.json"
SYNTHMORPH_REFINE=0 python benchmarks/refine_bench.py --pairs 12 --no-ours --no-greedy --none \
    --register --register-mode joint --json "$R/refine_bench_deform_network_$tag.json"
python benchmarks/template_bench.py --pairs mni fsaverage mni-t2w \
    --methods none ours-affine ours-joint \
    --ours-options="--refine 0" --json "$R/template_bench_network_$tag.json"
SYNTHMORPH_REFINE=0 python benchmarks/lambda_bench.py --pairs 4 \
    --json "$R/lambda_bench_deform_network_$tag.json" --plot "$F/lambda_deform_network_$tag.png"
python benchmarks/hyper_bench.py --model deform --pairs 32 \
    --json "$R/hyper_bench_deform_$tag.json" --plot "$F/hyper_lambda_deform_$tag.png"
fi
if [ "$part" != networks ]; then
# the defaults (--refine 15): T1w pairs with greedy side by side, templates, contrasts, lambda
SYNTHMORPH_REFINE=15 python benchmarks/refine_bench.py --pairs 12 --no-ours --register \
    --json "$R/refine_bench_register_$tag.json"
SYNTHMORPH_REFINE=15 python benchmarks/refine_bench.py --pairs 12 --no-ours --no-greedy \
    --register --register-mode affine --json "$R/refine_bench_affine_mode_$tag.json"
python benchmarks/template_bench.py --pairs mni fsaverage mni-t2w --methods ours-affine ours-joint \
    --json "$R/template_bench_defaults_$tag.json"
python benchmarks/contrast_bench.py --methods ours-affine ours-joint --figure "" \
    --json "$R/contrast_bench_defaults_$tag.json"
# across contrasts and people: FLAIR to another person's T1w (DLMUSE labels), and to the same
# person's T1w, as the BIDS-App registers a FLAIR (--cross-contrast yes)
SYNTHMORPH_REFINE=15 python benchmarks/refine_bench.py --pairs 12 --moving-contrast FLAIR \
    --no-ours --no-greedy --register --register-options "--cross-contrast yes" \
    --json "$R/refine_bench_flair_contrasts_$tag.json"
SYNTHMORPH_REFINE=15 python benchmarks/refine_bench.py --pairs 6 --same-subject \
    --moving-contrast FLAIR --no-ours --no-greedy --register \
    --register-options "--cross-contrast yes" \
    --json "$R/refine_bench_flair_same_subject_contrasts_$tag.json"
python benchmarks/lambda_bench.py --pairs 2 --json "$R/lambda_bench_$tag.json" \
    --plot "$F/lambda_$tag.png"
# images moved by known affines, back to themselves: the affine mode and the network alone
python benchmarks/known_affine_bench.py --methods ours ours-network \
    --json "$R/known_affine_bench_$tag.json"
python benchmarks/known_affine_bench.py --images chris chris-pdw --methods ours ours-network \
    --json "$R/known_affine_bench_chris_$tag.json"
fi
