# adaptflow image: the engine, the flows and the CLI; also runs the MLflow and Prefect servers of the stack
# (infra/docker-compose.yml).
#   docker build -t adaptflow .                          # GPU nodes: CUDA base, CUDA torch
#   docker build --build-arg VARIANT=cpu -t adaptflow:cpu .
#   docker run --rm -v "$PWD/../shared/data:/data:ro" -e ADAPTFLOW_DATA_ROOT=/data adaptflow:cpu build domains/tiny.yaml
ARG VARIANT=gpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS base-gpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev git build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends git build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv

FROM base-${VARIANT}
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

WORKDIR /app
# torch first, pinned, from the variant's index: an unpinned torch from PyPI would pick its own CUDA build.
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md ./
COPY adaptflow ./adaptflow
COPY flows ./flows
COPY tasks ./tasks
RUN pip install -e ".[server]"   # editable: deployments find flows/ and domains/ under /app
COPY domains ./domains
COPY infra ./infra

ENTRYPOINT ["adaptflow"]
CMD ["--help"]
