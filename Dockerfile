# adaptflow worker image: the engine, the flows and the CLI, CPU torch by default.
#   docker build -t adaptflow .
#   docker run --rm -v "$PWD/../shared/data:/data:ro" -e ADAPTFLOW_DATA_ROOT=/data adaptflow build domains/tiny.yaml
# For GPUs, build with TORCH_INDEX set to a CUDA wheel index.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN apt-get update && apt-get install -y --no-install-recommends git build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md ./
COPY adaptflow ./adaptflow
COPY flows ./flows
COPY tasks ./tasks
RUN pip install .
COPY domains ./domains
COPY infra ./infra

ENTRYPOINT ["adaptflow"]
CMD ["--help"]
