"""gunicorn settings for `lab-bastion serve`, read from the bastion's configuration model (the
supervisor passes every effective setting down as LAB_BASTION_*; labcore.bastion_config loads
them as it loads them everywhere)."""

import os

from bastion_app.front import UPSTREAM_ENV
from labcore import bastion_config

_cfg = bastion_config.load(os.environ.get(bastion_config.DATA_DIR_ENV), detect=False)

# Behind nginx (bastion_app.front: it buffers requests and sends artefacts, so slow clients never
# hold these threads) on a unix socket in the supervisor's private runtime directory; on the
# listen address itself only when started without the front (gunicorn by hand).
bind = f"unix:{os.environ[UPSTREAM_ENV]}" if os.environ.get(UPSTREAM_ENV) else _cfg.listen
workers = _cfg.workers
# gthread: each worker serves many connections with a thread pool, so a slow or long-lived client
# (a follower, a machine on a bad link) holds a thread, not a whole worker process.
# Log followers (SSE, GET /api/logs/<mac>/follow) hold their thread for the whole install, so each
# worker gets `followers` threads on top of `threads`, and the follow route refuses (503) a
# follower beyond that cap: machines always find `threads` free threads.
# Why not gevent: sqlite3 calls (and their busy-timeout waits) block the whole event loop of a
# worker, so one writer waiting on the lock would stall every machine on that worker. docs/logs.md.
worker_class = "gthread"
threads = _cfg.threads + _cfg.followers
# The app is imported once in the master and forked: a restart does not pay for four parallel
# imports (the store holds no connection or lock at fork time: create_app closes them).
preload_app = True
timeout = 60
graceful_timeout = 10
keepalive = 5
# Bounded request line and headers (the body is bounded by the app's MAX_CONTENT_LENGTH).
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
accesslog = _cfg.access_log or None
errorlog = "-"
loglevel = _cfg.log_level
proc_name = "lab-bastion"


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
