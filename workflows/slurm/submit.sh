#!/bin/bash
# Submit synthmorph_array.sbatch with one array task per participant.
#
#   submit.sh [--gpu] [--max-parallel N] [--dry-run] BIDS_DIR OUTPUT_DIR [synthmorph-app options]
#
# Counts the participants (BIDS_DIR/participants.tsv, or PARTICIPANTS_FILE), writes per-task
# logs to LOG_DIR (default OUTPUT_DIR/logs/slurm) and records the submission there so that
# resubmit_failed.sh can resubmit the failed tasks with the same arguments. Partition, account
# and the like come from Slurm's own variables (SBATCH_PARTITION, SBATCH_ACCOUNT, ...) or
# SBATCH_EXTRA (extra sbatch options, space-separated). The variables of synthmorph_array.sbatch
# (SYNTHMORPH_RUNNER, SYNTHMORPH_IMAGE, ...) are passed on to the tasks.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GPU=0
MAX_PARALLEL=""
DRY_RUN=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --gpu) GPU=1; shift ;;
        --max-parallel) MAX_PARALLEL=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; break ;;
        *) echo "submit.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ $# -lt 2 ]]; then
    echo "usage: $0 [--gpu] [--max-parallel N] [--dry-run] BIDS_DIR OUTPUT_DIR [app options]" >&2
    exit 2
fi
BIDS_DIR=$(realpath "$1")
OUTPUT_DIR=$(realpath -m "$2")
shift 2
LOG_DIR=$(realpath -m "${LOG_DIR:-${OUTPUT_DIR}/logs/slurm}")
export LOG_DIR

if [[ -n "${PARTICIPANTS_FILE:-}" ]]; then
    PARTICIPANTS_FILE=$(realpath "${PARTICIPANTS_FILE}")
    export PARTICIPANTS_FILE
    N=$(grep -cv '^[[:space:]]*$' "${PARTICIPANTS_FILE}" || true)
else
    N=$(tail -n +2 "${BIDS_DIR}/participants.tsv" | grep -cv '^[[:space:]]*$' || true)
fi
if [[ "${N}" -lt 1 ]]; then
    echo "submit.sh: no participants listed" >&2
    exit 18
fi

ARRAY="1-${N}${MAX_PARALLEL:+%${MAX_PARALLEL}}"
BASE_ARGS=(--output="${LOG_DIR}/synthmorph_%A_%a.log")
if [[ ${GPU} -eq 1 ]]; then
    BASE_ARGS+=(--gres=gpu:1)
fi
if [[ -n "${SBATCH_EXTRA:-}" ]]; then
    read -r -a EXTRA <<< "${SBATCH_EXTRA}"
    BASE_ARGS+=("${EXTRA[@]}")
fi
SBATCH_ARGS=(--parsable --array="${ARRAY}" "${BASE_ARGS[@]}")
JOB_ARGS=("${HERE}/synthmorph_array.sbatch" "${BIDS_DIR}" "${OUTPUT_DIR}" "$@")

if [[ ${DRY_RUN} -eq 1 ]]; then
    echo "sbatch ${SBATCH_ARGS[*]} ${JOB_ARGS[*]}"
    exit 0
fi
mkdir -p "${LOG_DIR}/status"
JOB_ID=$(sbatch "${SBATCH_ARGS[@]}" "${JOB_ARGS[@]}")
JOB_ID=${JOB_ID%%;*}
# What resubmit_failed.sh needs: the job, the task count, and the exact arguments (NUL-separated).
printf '%s\t%s\n' "${JOB_ID}" "${N}" > "${LOG_DIR}/submission.tsv"
printf '%s\0' "${BASE_ARGS[@]}" > "${LOG_DIR}/submission.sbatch_args"
printf '%s\0' "${JOB_ARGS[@]}" > "${LOG_DIR}/submission.job_args"
for NAME in SYNTHMORPH_RUNNER SYNTHMORPH_IMAGE SYNTHMORPH_BIN SINGULARITY_BINDS PARTICIPANTS_FILE \
            SCRATCH_DIR LOG_DIR KEEP_WORK; do
    if [[ -n "${!NAME:-}" ]]; then
        printf '%s=%s\0' "${NAME}" "${!NAME}"
    fi
done > "${LOG_DIR}/submission.env"
echo "submitted array job ${JOB_ID}: ${N} participant(s), logs in ${LOG_DIR}"
echo "${JOB_ID}"
