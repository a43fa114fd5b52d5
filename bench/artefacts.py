#!/usr/bin/env python3
"""Artefact serving: 50 concurrent downloads of one 200 MB file from a real `lab-bastion serve`
(the app checks GET /images/<path>, its nginx front sends the file: X-Accel-Redirect) against
Debian's nginx serving the same file from the same directory, in the same run.

Both servers get the same worker count and the same client (50 parallel `curl` processes), and
each is measured several rounds, alternating. Prints both throughputs and the ratio
(target: bastion >= 0.8 x nginx).

    python bench/artefacts.py [--size-mb 200] [--clients 50] [--rounds 3] [--workers 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import free_port, start_bastion, stop_process  # noqa: E402

NGINX_CONF = """\
daemon off;
master_process on;
user root;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /images/ {{ root {data}; }}
    }}
}}
"""


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["curl", "-sf", "-o", "/dev/null", url], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def measure(url: str, clients: int, size: int) -> float:
    """Start `clients` curl downloads at once; bytes per second over the whole batch."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(clients)]
    got = 0
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"curl {url} failed ({p.returncode}): {err}")
        got += int(float(out))
    elapsed = time.perf_counter() - t0
    if got != clients * size:
        raise SystemExit(f"downloaded {got} bytes, expected {clients * size}")
    return got / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    for tool in (nginx, "curl"):
        if not shutil.which(tool) and not Path(tool).exists():
            raise SystemExit(f"needs {tool} (Debian packages nginx-light and curl)")

    tmp = Path(tempfile.mkdtemp(prefix="lab-bench-artefacts-"))
    procs: list[subprocess.Popen] = []
    try:
        data = tmp / "data"
        blob = data / "images" / "bench" / "artefact.bin"
        blob.parent.mkdir(parents=True)
        size = args.size_mb * 1024 * 1024
        with open(blob, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1024 * 1024))
        path = "/images/bench/artefact.bin"

        bastion = start_bastion(data, workers=args.workers, timeout=60, log_dir=tmp)
        procs.append(bastion.proc)
        nport = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=args.workers, tmp=tmp, port=nport, data=data))
        procs.append(subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=open(tmp / "nginx.log", "wb"), start_new_session=True))  # noqa: SIM115
        urls = {"nginx": f"http://127.0.0.1:{nport}{path}", "bastion": bastion.url + path}
        for url in urls.values():
            wait_http(url)
        # warm the page cache and both servers once
        for url in urls.values():
            measure(url, 2, size)

        best = {"nginx": 0.0, "bastion": 0.0}
        print(f"artefact: {args.size_mb} MB, {args.clients} concurrent downloads, {args.workers} workers each, "
              f"{args.rounds} rounds", flush=True)
        for i in range(args.rounds):
            for name in ("nginx", "bastion") if i % 2 == 0 else ("bastion", "nginx"):
                rate = measure(urls[name], args.clients, size)
                best[name] = max(best[name], rate)
                print(f"  round {i + 1} {name:8s} {rate / 1e6:9.1f} MB/s", flush=True)
        ratio = best["bastion"] / best["nginx"]
        print(f"nginx (baseline):  {best['nginx'] / 1e6:.1f} MB/s")
        print(f"lab-bastion serve: {best['bastion'] / 1e6:.1f} MB/s")
        print(f"ratio bastion/nginx: {ratio:.2f} (target >= 0.80) {'OK' if ratio >= 0.8 else 'BELOW TARGET'}")
        return 0
    finally:
        for p in procs:
            stop_process(p, 20, group=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
