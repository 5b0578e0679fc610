# One image for web, workers, beat and the MLflow server.
# GPU workers need torch's CUDA build (the default on PyPI); CPU-only images can pass
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim
ARG TORCH_INDEX=https://pypi.org/simple
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 R1_HOME=/var/lib/r1platform
WORKDIR /app
# pango: WeasyPrint's certification PDFs; g++: AOTInductor compiles C++ on the worker.
RUN apt-get update && apt-get install -y --no-install-recommends \
      libpango-1.0-0 libpangoft2-1.0-0 g++ \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY r1platform r1platform
COPY pipelines pipelines
COPY gpu_workers gpu_workers
COPY templates templates
COPY static static
COPY manage.py gunicorn.conf.py ./
RUN pip install ".${EXTRAS}" && python manage.py collectstatic --noinput
EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.conf.py", "r1platform.wsgi"]
