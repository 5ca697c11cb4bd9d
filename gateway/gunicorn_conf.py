"""gunicorn settings of the gateway: ``gunicorn -c python:gateway.gunicorn_conf 'gateway:create_app()'``.

Read from the same ``FASHION_*`` variables as the app (bad values stop the master at start-up). Threaded
workers (``gthread``): a worker's threads wait on Triton while others decode. Prometheus multiprocess mode:
``PROMETHEUS_MULTIPROC_DIR`` (a private temporary folder when unset) is emptied at start and a dead
worker's live gauges are dropped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig

_config = GatewayConfig.from_env()
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Must be set before a worker imports prometheus_client; workers inherit the master's environment.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fashion-gateway-metrics-")

bind = os.environ.get("FASHION_BIND", f"0.0.0.0:{_config.port}")
workers = _config.workers
threads = _config.threads
worker_class = "gthread"
# A worker silent for this long is killed and replaced; well above one Triton deadline.
timeout = int(max(30, 3 * _config.timeout_s))
graceful_timeout = 25  # below the chart's terminationGracePeriodSeconds (30)
keepalive = 5
# Slow or lying clients: bounded request line and headers (gunicorn's defaults, stated here on purpose).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "gateway.logs.RequestIdFilter"}},
    "formatters": {
        "generic": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"},
        "gateway": {
            "format": "%(asctime)s %(levelname)s %(name)s [%(process)d] rid=%(request_id)s %(message)s"
        },
    },
    "handlers": {
        "gateway": {
            "class": "logging.StreamHandler",
            "formatter": "gateway",
            "filters": ["request_id"],
            "stream": "ext://sys.stderr",
        },
        # gunicorn's own handlers (its defaults are replaced, not merged, by this dict)
        "console": {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stdout"},
        "error_console": {
            "class": "logging.StreamHandler",
            "formatter": "generic",
            "stream": "ext://sys.stderr",
        },
    },
    "root": {"level": "INFO", "handlers": ["gateway"]},
    "loggers": {"gateway": {"handlers": ["gateway"], "level": "INFO", "propagate": False}},
}


def on_starting(server: Any) -> None:
    """Start with empty metric files: values from a previous run would be summed in."""
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                child.unlink()
            else:
                shutil.rmtree(child, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """Drop the live gauges of a worker that exited (killed, restarted or stopped)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
