# One image for every LLMOS process (worker, migrations, Flower). On x86_64 Linux, torch==2.13.0
# from the package index is the CUDA build, which GPU workers need; CPU-only hosts can install
# the CPU wheel first to keep the image small.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=0 LLMOS_HOME=/var/lib/llmos
WORKDIR /app
COPY pyproject.toml README.md ./
COPY llmos ./llmos
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[flower]'
ENTRYPOINT ["llmos"]
