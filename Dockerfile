# A runnable image of lime_jax (CPU). Build: docker build -t lime-jax .
# Run:   docker run --rm -v "$PWD/runs:/app/runs" lime-jax quickstart
# GPU variant: build with --build-arg JAX_EXTRA="jax[cuda12]==0.10.2" on a CUDA host and run
# with --gpus all; everything else is the same.
FROM python:3.11-slim

ARG JAX_EXTRA=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=3

WORKDIR /app
# Dependencies first, so code changes do not re-install them.
COPY pyproject.toml README.md ./
COPY lime_jax/__init__.py lime_jax/__init__.py
RUN pip install --upgrade pip && pip install -e . && \
    if [ -n "$JAX_EXTRA" ]; then pip install "$JAX_EXTRA"; fi
COPY . .
RUN pip install --no-deps -e .

ENTRYPOINT ["lime-jax"]
CMD ["--help"]
