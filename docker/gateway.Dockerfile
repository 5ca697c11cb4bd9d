# The gateway's image: Flask + gunicorn + tritonclient, no torch, no training dependencies.
# Build from the repository root (the context must hold pyproject.toml and the package folders):
#   docker build -f docker/gateway.Dockerfile -t <registry>/fashion-tagger-gateway:0.1.0 .
# Not buildable on the development machines (no Docker engine there): build it in CI or on a workstation.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# setuptools' package discovery needs every package folder present, even those the gateway never imports.
COPY pyproject.toml README.md ./
COPY fashion/ fashion/
COPY training/ training/
COPY export/ export/
COPY gateway/ gateway/
COPY loadtest/ loadtest/
COPY orchestration/ orchestration/
COPY tagging/ tagging/
RUN pip install ".[gateway]"

# A fixed non-root uid: the Helm chart runs the pod as 10001 with a read-only root file system.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin gateway
USER 10001:10001

ENV FASHION_PORT=8080 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
EXPOSE 8080

# What Kubernetes and `docker stop` send; gunicorn drains on it (gateway/gunicorn_conf.py): accepted requests
# are answered, new ones get 503 shutting_down, then it exits within its graceful_timeout.
STOPSIGNAL SIGTERM
# Exec form of: gunicorn -c python:gateway.gunicorn_conf 'gateway:create_app()' (gunicorn is PID 1 and gets SIGTERM).
CMD ["gunicorn", "-c", "python:gateway.gunicorn_conf", "gateway:create_app()"]
