# synthmorph-app: SynthMorph registration as a BIDS-App, in a container.
#
# Build from the repository root (hatch-vcs cannot see .git here, so pass the version):
#   docker build -t synthmorph-app:latest \
#       --build-arg VERSION="$(python -m hatchling version)" \
#       --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#       --build-arg VCS_REF="$(git rev-parse --short HEAD)" .
# Run (no network needed; read-only root file system, any user):
#   docker run --rm --read-only --tmpfs /tmp --gpus all \
#       -v /data/bids:/data:ro -v /data/out:/out synthmorph-app:latest /data /out participant
# Without --gpus the same image runs on the CPU (--device auto falls back).
# Singularity/Apptainer: see singularity.def.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Stage 1: build the wheel, install it with its dependencies into /opt/venv, fetch templates.
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY synthmorph_app/ synthmorph_app/
COPY scripts/fetch_templates.py scripts/

# The version is given here because .dockerignore keeps .git out of the build context.
ARG VERSION=0+unknown
# The default PyPI wheel of torch==2.13.0 (pinned in pyproject.toml) is the CUDA build; it
# bundles the CUDA runtime, so only the host's NVIDIA driver is needed (docker --gpus,
# apptainer --nv), and without a GPU it runs on the CPU.
RUN python -m venv /opt/venv \
 && SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" pip wheel --no-deps --wheel-dir /dist . \
 && pip install /dist/synthmorph_app-*.whl \
 && pip uninstall --yes pip \
 && synthmorph-app --version

# Templates are fetched now, at BUILD time: at run time nothing is downloaded (compute nodes
# have no internet). The script prunes TemplateFlow's placeholders and checks every file.
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=off
RUN python scripts/fetch_templates.py --tf-dir "${TEMPLATEFLOW_HOME}" \
 && chmod -R a+rX /opt/venv "${TEMPLATEFLOW_HOME}"

# ---------------------------------------------------------------------------------------------
# Stage 2: the runtime: the venv and the templates only (no compilers, no caches, no wheels).
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0+unknown
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="synthmorph-app" \
      org.opencontainers.image.description="SynthMorph any-contrast MRI registration (PyTorch) as a BIDS-App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/synthmorph-app/synthmorph-app" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.authors="synthmorph-app developers"

# Files keep the builder's modes: world-readable, so Singularity's arbitrary UIDs can read them.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/templateflow /opt/templateflow

# A non-root user whose home nothing needs to write to: the app works with a read-only $HOME
# and a read-only root file system; scratch goes to /tmp (a tmpfs with docker --read-only).
RUN useradd --create-home --home-dir /home/synthmorph --uid 1000 --user-group \
        --shell /usr/sbin/nologin synthmorph \
 && chmod 0555 /home/synthmorph

# Threads are pinned to one per process; the app raises torch's count per registration node
# (--omp-nthreads), so N parallel registrations never oversubscribe the CPUs. OpenMP threads
# sleep while they wait, so a busy core elsewhere does not stall them (the package sets this
# too; benchmarks/README.md, "A busy core").
ENV PATH=/opt/venv/bin:$PATH \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=off \
    NIPYPE_NO_ET=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    OMP_NUM_THREADS=1 \
    OMP_WAIT_POLICY=PASSIVE \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Numeric, so that runtimes that check runAsNonRoot need not resolve the name.
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["/opt/venv/bin/synthmorph-app"]
CMD ["--help"]
