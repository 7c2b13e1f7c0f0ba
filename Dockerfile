# One image for every LLMOS process (api, worker, reconciler, supervisor, beat, Flower, migrations).
# torch is pinned to 2.13.0 and installed first, by build argument:
#   TORCH=cpu   (default) the CPU wheel from download.pytorch.org/whl/cpu: a small image
#   TORCH=cuda  the package index's x86_64 Linux wheel, the CUDA build GPU workers need
#   TORCH=cuXYZ that CUDA variant from download.pytorch.org/whl/cuXYZ (e.g. cu128)
# `pip install .` then finds torch==2.13.0 satisfied and keeps the one installed here.
FROM python:3.11-slim
ARG TORCH=cpu
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LLMOS_HOME=/var/lib/llmos
RUN set -eu; \
    case "$TORCH" in \
      cpu)  pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install --no-cache-dir torch==2.13.0 ;; \
      cu*)  pip install --no-cache-dir torch==2.13.0 --index-url "https://download.pytorch.org/whl/$TORCH" ;; \
      *)    echo "TORCH must be cpu, cuda or cuXYZ, got '$TORCH'" >&2; exit 1 ;; \
    esac
WORKDIR /app
COPY pyproject.toml README.md ./
COPY llmos ./llmos
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[flower]' && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
ENTRYPOINT ["llmos"]
