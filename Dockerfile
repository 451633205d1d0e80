# The image of mmflow's Ray pods on Kubernetes (infra/k8s/): Python 3.11, the locked environment
# from uv.lock without the development tools, the `mmflow` command, and pipelines/.
#   docker build -t registry.example.com/mmflow:0.1.0 . && docker push registry.example.com/mmflow:0.1.0
# KubeRay starts Ray in it with /bin/bash; `ray`, `python` and `mmflow` are the environment's.
FROM python:3.11-slim

# The uv of the README's commands and .ci/run.
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never

WORKDIR /app

# The dependencies alone first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project

# Then the project (its `mmflow` script) and the pipelines the RayJob names (/app/pipelines/...).
COPY README.md ./
COPY mmflow/ mmflow/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev
COPY pipelines/ pipelines/

ENV PATH="/app/.venv/bin:$PATH"

# Ray's own images run as uid 1000; KubeRay needs no root. Its home holds mmflow's model cache.
RUN useradd --create-home --uid 1000 ray
USER ray

CMD ["mmflow", "--help"]
