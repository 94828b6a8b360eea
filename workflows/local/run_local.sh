#!/bin/bash
# synthmorph-app on one workstation: participants in parallel with GNU parallel or xargs, the
# equivalent of the Slurm array job in ../slurm/.
#
#   run_local.sh [--jobs N] [--threads T] [--failed-only] BIDS_DIR OUTPUT_DIR [app options]
#
#   --jobs N        participants at once (default 2)
#   --threads T     CPU threads per participant (default: CPUs / N, at least 1)
#   --failed-only   only the participants whose last status is not "ok" (a rerun after failures)
#
# Each participant runs in its own scratch work folder (deleted on success, kept on failure),
# logs to LOG_DIR/sub-<label>.log and records LOG_DIR/status/sub-<label>.status ("ok" or
# "failed <code> <work folder>"). Exits 1 when any participant failed, listing them.
#
# Variables, as for the Slurm job:
#   SYNTHMORPH_RUNNER  direct (default: synthmorph-app from PATH), singularity/apptainer, docker
#   SYNTHMORPH_IMAGE   .sif file (default ./synthmorph-app.sif) or Docker image
#                      (default synthmorph-app:latest)
#   SYNTHMORPH_BIN     the command for the direct runner (default: synthmorph-app)
#   USE_GPU            1: pass the GPU to the container (--nv or --gpus all)
#   PARTICIPANTS_FILE  labels, one per line, instead of BIDS_DIR/participants.tsv
#   SCRATCH_DIR        where work folders go (default: $TMPDIR, else /tmp)
#   LOG_DIR            default OUTPUT_DIR/logs/local
#   KEEP_WORK          1: keep work folders even on success
#   USE_XARGS          1: use xargs even where GNU parallel is installed
set -euo pipefail

# ---- one participant (the script calls itself this way, once per participant) -------------
run_one() {
    local label=$1 bids=$2 out=$3 threads=$4
    shift 4
    local status="${LOG_DIR}/status/sub-${label}.status"
    local scratch=${SCRATCH_DIR:-${TMPDIR:-/tmp}}
    mkdir -p "${scratch}"
    local work
    work=$(mktemp -d "${scratch}/synthmorph_local_${label}_XXXXXX")
    echo "running" > "${status}"
    local args=("${bids}" "${out}" participant --participant-label "${label}" -w "${work}"
                --nprocs "${threads}" --omp-nthreads "${threads}" "$@")
    local code=0
    case "${SYNTHMORPH_RUNNER:-direct}" in
        direct)
            # shellcheck disable=SC2086  # SYNTHMORPH_BIN may hold a command and its options
            ${SYNTHMORPH_BIN:-synthmorph-app} "${args[@]}" || code=$?
            ;;
        singularity | apptainer)
            local engine gpu=()
            engine=$(command -v apptainer || command -v singularity || true)
            [[ "${USE_GPU:-0}" == 1 ]] && gpu=(--nv)
            "${engine:-apptainer}" run --cleanenv --containall "${gpu[@]}" \
                -B "${bids}:${bids}:ro,${out},${work}" \
                "${SYNTHMORPH_IMAGE:-synthmorph-app.sif}" "${args[@]}" || code=$?
            ;;
        docker)
            local gpu=()
            [[ "${USE_GPU:-0}" == 1 ]] && gpu=(--gpus all)
            docker run --rm --read-only --tmpfs /tmp --user "$(id -u):$(id -g)" "${gpu[@]}" \
                -v "${bids}:${bids}:ro" -v "${out}:${out}" -v "${work}:${work}" \
                "${SYNTHMORPH_IMAGE:-synthmorph-app:latest}" "${args[@]}" || code=$?
            ;;
        *)
            echo "SYNTHMORPH_RUNNER must be direct, singularity, apptainer or docker" >&2
            code=2
            ;;
    esac
    if [[ ${code} -eq 0 ]]; then
        echo "ok" > "${status}"
        [[ "${KEEP_WORK:-0}" == 1 ]] || rm -rf "${work}"
    else
        echo "failed ${code} ${work}" > "${status}"
        echo "sub-${label}: FAILED (exit ${code}); work folder kept: ${work}" >&2
    fi
    return "${code}"
}

if [[ "${1:-}" == --one ]]; then
    shift
    label=$1
    LOG_DIR=${LOG_DIR:?}
    run_one "$@" > "${LOG_DIR}/sub-${label}.log" 2>&1
    exit $?
fi

# ---- the driver ---------------------------------------------------------------------------
JOBS=2
THREADS=""
FAILED_ONLY=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --jobs) JOBS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --failed-only) FAILED_ONLY=1; shift ;;
        --) shift; break ;;
        *) echo "run_local.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ $# -lt 2 ]]; then
    echo "usage: $0 [--jobs N] [--threads T] [--failed-only] BIDS_DIR OUTPUT_DIR [app options]" >&2
    exit 2
fi
BIDS_DIR=$(realpath "$1")
OUTPUT_DIR=$(realpath -m "$2")
shift 2
if [[ -z "${THREADS}" ]]; then
    THREADS=$(( $(nproc) / JOBS ))
    (( THREADS >= 1 )) || THREADS=1
fi
LOG_DIR=$(realpath -m "${LOG_DIR:-${OUTPUT_DIR}/logs/local}")
export LOG_DIR
mkdir -p "${OUTPUT_DIR}" "${LOG_DIR}/status"

if [[ -n "${PARTICIPANTS_FILE:-}" ]]; then
    mapfile -t ALL < <(grep -v '^[[:space:]]*$' "${PARTICIPANTS_FILE}" | cut -f1)
else
    mapfile -t ALL < <(tail -n +2 "${BIDS_DIR}/participants.tsv" | grep -v '^[[:space:]]*$' \
        | cut -f1)
fi
LABELS=()
for label in "${ALL[@]}"; do
    label=${label#sub-}
    label=${label//[[:space:]]/}
    if [[ ${FAILED_ONLY} -eq 1 && -f "${LOG_DIR}/status/sub-${label}.status" ]]; then
        read -r state _ < "${LOG_DIR}/status/sub-${label}.status" || true
        [[ "${state}" == ok ]] && continue
    fi
    LABELS+=("${label}")
done
if [[ ${#LABELS[@]} -eq 0 ]]; then
    echo "run_local.sh: nothing to run"
    exit 0
fi

SELF=$(realpath "${BASH_SOURCE[0]}")
echo "run_local.sh: ${#LABELS[@]} participant(s), ${JOBS} at a time, ${THREADS} thread(s) each;" \
    "logs in ${LOG_DIR}"
if command -v parallel > /dev/null && parallel --version 2> /dev/null | grep -q GNU \
        && [[ "${USE_XARGS:-0}" != 1 ]]; then
    parallel --will-cite --quote --jobs "${JOBS}" --joblog "${LOG_DIR}/parallel.joblog" \
        "${SELF}" --one {} "${BIDS_DIR}" "${OUTPUT_DIR}" "${THREADS}" "$@" \
        ::: "${LABELS[@]}" || true
else
    printf '%s\n' "${LABELS[@]}" | xargs -P "${JOBS}" -I{} \
        "${SELF}" --one {} "${BIDS_DIR}" "${OUTPUT_DIR}" "${THREADS}" "$@" || true
fi

FAILED=()
for label in "${LABELS[@]}"; do
    state=""
    if [[ -f "${LOG_DIR}/status/sub-${label}.status" ]]; then
        read -r state _ < "${LOG_DIR}/status/sub-${label}.status" || true
    fi
    [[ "${state}" == ok ]] || FAILED+=("${label}")
done
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "run_local.sh: ${#FAILED[@]} participant(s) FAILED: ${FAILED[*]}" \
        "(logs in ${LOG_DIR}; rerun with --failed-only)" >&2
    exit 1
fi
echo "run_local.sh: all ${#LABELS[@]} participant(s) finished"
