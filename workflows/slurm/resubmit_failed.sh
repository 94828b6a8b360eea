#!/bin/bash
# Resubmit the array tasks of the last submit.sh submission that did not finish "ok".
#
#   resubmit_failed.sh [--dry-run] [--force] LOG_DIR
#
# LOG_DIR is the submission's log folder (default of submit.sh: OUTPUT_DIR/logs/slurm). A task
# counts as failed when its status file (LOG_DIR/status/task-<i>.status) is missing or does not
# start with "ok": it failed, was cancelled, hit its time limit, or never started. The same
# sbatch options, arguments and variables (SYNTHMORPH_RUNNER, ...) as the first submission are
# used; only --array changes. Refuses while the last job still runs, unless --force.
set -euo pipefail

DRY_RUN=0
FORCE=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --force) FORCE=1; shift ;;
        *) echo "resubmit_failed.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--dry-run] [--force] LOG_DIR" >&2
    exit 2
fi
LOG_DIR=$(realpath "$1")
if [[ ! -f "${LOG_DIR}/submission.tsv" ]]; then
    echo "resubmit_failed.sh: ${LOG_DIR} holds no submission.tsv (submit with submit.sh)" >&2
    exit 2
fi
IFS=$'\t' read -r LAST_JOB N < "${LOG_DIR}/submission.tsv"

if [[ ${FORCE} -eq 0 ]] && command -v squeue > /dev/null \
        && [[ -n "$(squeue -h -j "${LAST_JOB}" 2> /dev/null || true)" ]]; then
    echo "resubmit_failed.sh: job ${LAST_JOB} is still queued or running; wait for it," \
        "or pass --force" >&2
    exit 3
fi

FAILED=()
for ((i = 1; i <= N; i++)); do
    STATUS_FILE="${LOG_DIR}/status/task-${i}.status"
    STATE=""
    if [[ -f "${STATUS_FILE}" ]]; then
        read -r STATE _ < "${STATUS_FILE}" || true
    fi
    if [[ "${STATE}" != ok ]]; then
        FAILED+=("${i}")
    fi
done
if [[ ${#FAILED[@]} -eq 0 ]]; then
    echo "all ${N} task(s) of job ${LAST_JOB} finished ok; nothing to resubmit"
    exit 0
fi
ARRAY=$(IFS=,; echo "${FAILED[*]}")

mapfile -d '' BASE_ARGS < "${LOG_DIR}/submission.sbatch_args"
mapfile -d '' JOB_ARGS < "${LOG_DIR}/submission.job_args"
if [[ -f "${LOG_DIR}/submission.env" ]]; then
    mapfile -d '' ENV_VARS < "${LOG_DIR}/submission.env"
    for VAR in "${ENV_VARS[@]}"; do
        export "${VAR?}"
    done
fi

echo "resubmitting ${#FAILED[@]} of ${N} task(s): --array=${ARRAY}"
if [[ ${DRY_RUN} -eq 1 ]]; then
    echo "sbatch --array=${ARRAY} ${BASE_ARGS[*]} ${JOB_ARGS[*]}"
    exit 0
fi
for i in "${FAILED[@]}"; do
    rm -f "${LOG_DIR}/status/task-${i}.status"
done
JOB_ID=$(sbatch --parsable --array="${ARRAY}" "${BASE_ARGS[@]}" "${JOB_ARGS[@]}")
JOB_ID=${JOB_ID%%;*}
printf '%s\t%s\n' "${JOB_ID}" "${N}" > "${LOG_DIR}/submission.tsv"
echo "submitted array job ${JOB_ID}"
echo "${JOB_ID}"
