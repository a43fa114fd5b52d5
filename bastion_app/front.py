"""The HTTP front of `lab-bastion serve`: nginx on the listen address, gunicorn behind it on a unix
socket that only the bastion's own user can reach.

Why a front (docs/reliability.md, "Threat model"): gunicorn's gthread worker gives each connection
a thread from the moment it is readable, reads the request with blocking calls and writes the
response the same way, so half-sent requests and slow readers of a large artefact each hold one of
the threads that answer /dispatch. gunicorn's own deployment guide says to put a buffering proxy
in front for exactly this (https://docs.gunicorn.org/en/stable/deploy.html, "we strongly advise
that you use Nginx"). nginx reads requests and writes responses asynchronously, about a kilobyte
of state per waiting client:

- a request reaches gunicorn only once its header and body are complete (client_header_timeout,
  client_body_timeout; proxy_request_buffering is on by default);
- artefacts under /images are checked by the app (which file, never dot files or *.part, inside
  the images directory), which answers with ``X-Accel-Redirect`` to an internal location: nginx
  then sends the file with sendfile, Range and ETag, and no gunicorn thread waits for the reader
  (https://nginx.org/en/docs/http/ngx_http_proxy_module.html#proxy_ignore_headers, X-Accel-Redirect);
- at most :data:`PER_SOURCE_CONNECTIONS` requests at once per client address (limit_conn, 429;
  https://nginx.org/en/docs/http/ngx_http_limit_conn_module.html: it counts requests whose header
  has been read, so the header timeout is what bounds half-sent ones).

The client's address reaches the app as the only X-Forwarded-For value (nginx sets it; a client's
own header is replaced) and :func:`behind_front` makes it the request's ``remote_addr``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

from labcore.bastion_config import Config, ConfigError

#: Requests at once from one client address (a machine needs a few; labctl following many installs
#: from one workstation needs one per machine). More are answered 429 at once.
PER_SOURCE_CONNECTIONS = 64
#: Seconds a client may take to send its request header, and between two reads of its body.
REQUEST_TIMEOUT_S = 10
#: Seconds a reader may leave a response unread before it is dropped.
SEND_TIMEOUT_S = 60
#: The longest a proxied answer may be silent: a follower's heartbeat (at most 300 s) and a margin.
UPSTREAM_READ_TIMEOUT_S = 330
#: The environment variable that tells gunicorn (bastion_app.gunicorn_conf) and the app
#: (bastion_app.wsgi) that they run behind the front, on this unix socket.
UPSTREAM_ENV = "LAB_BASTION_UPSTREAM_SOCKET"
#: Where the app sends nginx for an artefact (internal: clients cannot request it).
ARTEFACTS_LOCATION = "/_artefacts/"

_UNSAFE = set('"\\;{}$#\'') | {chr(c) for c in range(33)}


def binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise ConfigError("nginx is not installed: lab-bastion serve runs it in front of gunicorn so that slow "
                          "clients cannot take the threads that answer machines; install Debian's nginx-light "
                          "(make deps-system)")
    return found


def _safe(path: Path) -> str:
    text = str(path)
    if set(text) & _UNSAFE:
        raise ConfigError(f"{text}: the data directory's path may not contain spaces, quotes or any of \\;{{}}$# "
                          "(nginx's configuration names it)")
    return text


def _listen(cfg: Config) -> str:
    host, port = cfg.listen_host, cfg.listen_port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def config_text(cfg: Config, root: Path, upstream: Path) -> str:
    """nginx.conf for this bastion; ``root`` holds nginx's pid and temporary files."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = 32768 if hard == resource.RLIM_INFINITY else min(hard, 32768)
    images = _safe(cfg.images_path.resolve())
    tmp = _safe(root)
    temp_paths = "\n".join(f"    {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers need the data directory and the socket
    busy = json.dumps({"error": "too many connections from this host",
                       "detail": f"at most {PER_SOURCE_CONNECTIONS} requests at once per address; retry when one has finished"})
    return f"""# written by lab-bastion serve (bastion_app/front.py) at each start: do not edit
daemon off;
master_process on;
{user}worker_processes auto;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections {max(512, nofile // 2 - 64)};
}}
http {{
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    client_header_timeout {REQUEST_TIMEOUT_S}s;
    client_body_timeout {REQUEST_TIMEOUT_S}s;
    send_timeout {SEND_TIMEOUT_S}s;
    keepalive_timeout 5s;
    reset_timedout_connection on;
    client_max_body_size {cfg.max_body_bytes + 65536};
    client_body_buffer_size 64k;
    large_client_header_buffers 4 16k;
{temp_paths}
    proxy_max_temp_file_size 64m;
    limit_conn_zone $binary_remote_addr zone=per_source:4m;
    limit_conn_status 429;
    limit_conn_log_level warn;
    # HTTP/1.1 and kept-alive connections to gunicorn: an answer the app gives before reading a
    # request's body (401, 413, 429) then never meets a closed socket (a reset: nginx's 502)
    upstream bastion {{
        server unix:{_safe(upstream)};
        keepalive 32;
    }}
    server {{
        listen {_listen(cfg)};
        limit_conn per_source {PER_SOURCE_CONNECTIONS};
        error_page 429 @busy;
        # nginx refuses TRACE itself (405 without Allow): the app answers it as it answers any
        # method a route does not take (405 with Allow, JSON)
        error_page 405 = @app;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto "";
        proxy_set_header X-Forwarded-Protocol "";
        proxy_set_header X-Forwarded-Ssl "";
        proxy_read_timeout {UPSTREAM_READ_TIMEOUT_S}s;
        location / {{
            proxy_pass http://bastion;
        }}
        location @app {{
            proxy_pass http://bastion;
        }}
        location {ARTEFACTS_LOCATION} {{
            internal;
            alias {images}/;
            types {{ }}
            default_type application/octet-stream;
            add_header Cache-Control "no-cache";
        }}
        location @busy {{
            default_type application/json;
            add_header Retry-After 1 always;
            return 429 '{busy}\\n';
        }}
    }}
}}
"""


def write_config(cfg: Config, root: Path, upstream: Path) -> Path:
    conf = root / "nginx.conf"
    conf.write_text(config_text(cfg, root, upstream))
    return conf


def argv(conf: Path, nginx: str = "nginx") -> list[str]:
    """nginx in the foreground, its early errors on stderr (-e: nginx 1.19.5 and later)."""
    return [nginx, "-e", "stderr", "-p", str(conf.parent), "-c", str(conf)]


def behind_front(app) -> None:
    """The app behind nginx: the client's address is X-Forwarded-For's only value (nginx sets it;
    the unix socket is reachable by nobody else), and artefacts are handed to nginx to send."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)
    app.config["LAB_ARTEFACTS_ACCEL"] = ARTEFACTS_LOCATION
