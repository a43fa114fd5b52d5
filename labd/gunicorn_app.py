"""gunicorn inside `labd serve` (its master is the labd process): gthread workers, TLS, the app
preloaded in the master and forked (the store opens its pool in each worker on first use)."""

from __future__ import annotations

import os

from gunicorn.app.base import BaseApplication

from labd.config import Config


def _child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


class LabdGunicorn(BaseApplication):
    def __init__(self, cfg: Config):
        self.cfg_labd = cfg
        super().__init__()

    def load_config(self):
        c = self.cfg_labd
        settings = {
            "bind": c.listen, "workers": c.workers, "worker_class": "gthread", "threads": c.threads,
            "preload_app": True, "timeout": 60, "graceful_timeout": 10, "keepalive": 5,
            "limit_request_line": 4094, "limit_request_fields": 50, "limit_request_field_size": 8190,
            "certfile": str(c.cert_path), "keyfile": str(c.key_path),
            "accesslog": "-", "errorlog": "-", "loglevel": "info", "proc_name": "labd",
            "child_exit": _child_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        from labd.app import create_app

        return create_app(self.cfg_labd)
