# A runnable image of lime_jax (CPU). Build: docker build -t lime-jax .
# Run:   docker run --rm -v "$PWD/runs:/app/runs" lime-jax quickstart
# GPU variant: build with --build-arg JAX_EXTRA="jax[cuda12]==0.10.2" on a CUDA host and run
# with --gpus all (several nodes: see docs/scaling.md); everything else is the same.
# Beam workers (Dataflow --sdk_container_image, Flink/Spark workers): --build-arg EXTRAS=beam.
# Install steps follow scripts/setup_venv.sh (pip upgrade, then an editable install).
FROM python:3.11-slim

ARG JAX_EXTRA=""
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=3

WORKDIR /app
# Dependencies first, so code changes do not re-install them.
COPY pyproject.toml README.md ./
COPY lime_jax/__init__.py lime_jax/__init__.py
# JAX_EXTRA arrives pinned (jax[cuda12]==0.10.2); hadolint cannot see inside the build arg.
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir --upgrade pip==26.3 && \
    if [ -n "$EXTRAS" ]; then python -m pip install --no-cache-dir -e ".[$EXTRAS]"; \
    else python -m pip install --no-cache-dir -e .; fi && \
    if [ -n "$JAX_EXTRA" ]; then python -m pip install --no-cache-dir "$JAX_EXTRA"; fi
COPY . .
RUN python -m pip install --no-cache-dir --no-deps -e .

ENTRYPOINT ["lime-jax"]
CMD ["--help"]
