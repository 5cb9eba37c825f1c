# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api -t qadistill-api .                 CPU torch, no teacher weight packages
#   docker build --target worker -t qadistill-worker .           CUDA torch (TORCH_VARIANT=cuda, the default)
#   docker build --target worker --build-arg TORCH_VARIANT=cpu -t qadistill-worker-cpu .
# torch is installed first, from PyTorch's own index for the chosen build; the project's dependencies then find
# its pin (torch==TORCH_VERSION, as in pyproject.toml) satisfied and leave it alone. No secret is baked in:
# settings and keys come from the environment at run time (docker-compose.yml, .env.example).

ARG PYTHON_VERSION=3.11

# --- every stage: Python, a non-root user, no model hub ----------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 10001 qadistill \
    && useradd --uid 10001 --gid qadistill --create-home --shell /usr/sbin/nologin qadistill
WORKDIR /srv/qadistill

# --- dependencies: one virtual environment per image; an empty package stands for the code, so that a code
# change reinstalls nothing -------------------------------------------------------------------------------------
FROM base AS venv
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
RUN mkdir -p app workers && touch app/__init__.py workers/__init__.py

FROM venv AS api-deps
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && pip install ".[s3]" \
    && pip uninstall -y qadistill

FROM venv AS worker-deps
ARG TORCH_VERSION=2.13.0
# cuda: PyTorch's CUDA build (TORCH_CUDA names its index: cu126, cu128, ...); cpu: the CPU build.
ARG TORCH_VARIANT=cuda
ARG TORCH_CUDA=cu128
RUN case "${TORCH_VARIANT}" in \
        cuda) index="${TORCH_CUDA}" ;; \
        cpu) index=cpu ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "https://download.pytorch.org/whl/${index}" "torch==${TORCH_VERSION}" \
    && pip install ".[s3,models]" \
    && pip uninstall -y qadistill

# --- the images: an environment, the code, the non-root user -----------------------------------------------------
FROM base AS api
COPY --from=api-deps /opt/venv /opt/venv
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY workers ./workers
COPY app ./app
RUN pip install --no-deps . && rm -rf build ./*.egg-info \
    && mkdir -p /var/lib/qadistill && chown qadistill:qadistill /var/lib/qadistill
USER qadistill
ENV QADISTILL_HOME=/var/lib/qadistill \
    QADISTILL_ENVIRONMENT=production \
    QADISTILL_HOST=0.0.0.0 \
    QADISTILL_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["qadistill", "api"]

FROM base AS worker
COPY --from=worker-deps /opt/venv /opt/venv
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY workers ./workers
COPY app ./app
RUN pip install --no-deps . && rm -rf build ./*.egg-info \
    && mkdir -p /var/lib/qadistill && chown qadistill:qadistill /var/lib/qadistill
USER qadistill
ENV QADISTILL_HOME=/var/lib/qadistill \
    QADISTILL_ENVIRONMENT=production
# Prometheus metrics of the worker (QADISTILL_WORKER_METRICS_PORT).
EXPOSE 9101
# The reconciliation loop reports a heartbeat four times a lease; none for three leases is unhealthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 CMD ["qadistill", "worker-health"]
# Consumes queue gpu on a host with a GPU, else cpu; `qadistill worker -Q cpu` (or gpu) says which.
CMD ["qadistill", "worker"]
