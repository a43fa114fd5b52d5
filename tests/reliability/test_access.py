"""Access: the operator token guards every operator endpoint, is private and never logged; the
install token guards progress and logs; bodies and headers are bounded; a flood of bad requests
does not slow dispatch for good ones beyond 2x."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
import requests

from tests.support import synthetic_mac

MAC = "52:54:00:aa:bb:01"


def operator_operations(bastion):
    doc = requests.get(bastion.url + "/api/openapi.json").json()
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if isinstance(op, dict) and op.get("security"):
                ops.append((method.upper(), re.sub(r"\{mac\}", MAC, path)))
    return ops


def test_every_operator_endpoint_needs_the_token(bastion, record):
    requests.post(bastion.url + "/api/discover", json={"mac": MAC, "hardware": {}})
    ops = operator_operations(bastion)
    assert len(ops) >= 10
    checked = 0
    for method, path in ops:
        for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": bastion.token},
                        {"Authorization": "Bearer " + bastion.token[:-1]}, {"Authorization": "Basic " + bastion.token}):
            r = requests.request(method, bastion.url + path, headers=headers, json={"mac": MAC})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"] == "unauthorized"
            checked += 1
    # and nothing changed
    m = requests.get(f"{bastion.url}/api/machines/{MAC}", headers=bastion.headers).json()
    assert m["state"] == "discovered" and [e["kind"] for e in m["events"]] == ["discover"]
    record(operator_operations=len(ops), unauthorised_requests=checked, accepted=0)


def test_token_is_private_and_never_logged(bastion):
    s = bastion.session()
    s.get(bastion.url + "/api/machines")
    s.post(bastion.url + "/api/install", data=b"{bad json")
    requests.get(bastion.url + "/api/machines", headers={"Authorization": "Bearer " + bastion.token + "x"})
    assert (bastion.data_dir / "token").stat().st_mode & 0o777 == 0o600
    assert bastion.token not in bastion.log()
    for f in bastion.data_dir.rglob("*"):
        if f.is_file() and f.name != "token":
            assert bastion.token.encode() not in f.read_bytes(), f


def _queued_with_token(bastion, mac):
    s = bastion.session()
    s.post(bastion.url + "/api/discover", json={"mac": mac, "hardware": {}})
    host = "acc" + mac.replace(":", "")
    assert s.post(bastion.url + "/api/install", json={"mac": mac, "hostname": host, "role": "vanilla", "os": "fedora-43"}).status_code == 202
    text = requests.get(bastion.url + "/dispatch", params={"mac": mac}).text
    return re.search(r"token=([A-Za-z0-9_-]+)", text).group(1)


def test_progress_and_logs_need_the_install_token(bastion):
    mac = "52:54:00:aa:bb:02"
    token = _queued_with_token(bastion, mac)
    other = _queued_with_token(bastion, "52:54:00:aa:bb:03")
    for tok, expected in ((None, 422), ("", 422), ("A" * 32, 403), (other, 403), (bastion.token, 403)):
        body = {"mac": mac, "stage": "packages", "percent": 5, "message": "forged"}
        if tok is not None:
            body["token"] = tok
        assert requests.post(bastion.url + "/api/progress", json=body).status_code == expected
        lines = {"mac": mac, "lines": ["forged line"], **({"token": tok} if tok is not None else {})}
        assert requests.post(bastion.url + "/api/log", json=lines).status_code in (expected, 403, 422)
    m = requests.get(f"{bastion.url}/api/machines/{mac}", headers=bastion.headers).json()
    assert m["message"] != "forged"
    logs = requests.get(f"{bastion.url}/api/logs/{mac}", headers=bastion.headers).json()
    assert "forged line" not in str(logs)
    assert requests.post(bastion.url + "/api/progress", json={"mac": mac, "token": token, "stage": "packages"}).status_code == 200


def _raw(bastion, data: bytes) -> bytes:
    host, port = bastion.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        return s.recv(4096)


def test_bodies_and_headers_are_bounded(bastion, record):
    r = requests.post(bastion.url + "/api/discover", data=b"x" * (1024 * 1024 + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    big_header = _raw(bastion, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert big_header.split(b" ")[1] in (b"400", b"431"), big_header[:80]
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(120))
    many_headers = _raw(bastion, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert many_headers.split(b" ")[1] in (b"400", b"431"), many_headers[:80]
    long_line = _raw(bastion, b"GET /dispatch?mac=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert long_line.split(b" ")[1] in (b"400", b"414"), long_line[:80]
    assert requests.get(bastion.url + "/healthz").status_code == 200
    record(body_limit_bytes=1024 * 1024, header_field_limit_bytes=8190, header_count_limit=50, request_line_limit=4094)


def _dispatch_latencies(url: str, n: int, macs: list[str]) -> list[float]:
    out = []
    s = requests.Session()
    for i in range(n):
        t = time.perf_counter()
        r = s.get(url + "/dispatch", params={"mac": macs[i % len(macs)]}, timeout=30)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200
    return out


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _flood(url: str, token: str, mac: str, stop, go, sent) -> None:
    """A separate process (so the measuring client is not slowed by the flood's GIL): 4 threads
    sending bad requests back to back while `go` is set, until told to stop."""
    bad = [
        ("POST", "/api/install", {"data": b"{not json"}),
        ("GET", "/api/machines", {"headers": {"Authorization": "Bearer wrong"}}),
        ("POST", "/api/progress", {"json": {"mac": mac, "token": "A" * 32, "stage": "x"}}),
        ("GET", "/dispatch", {"params": {"mac": "zz"}}),
        ("POST", "/api/discover", {"json": {"mac": "nope"}}),
        ("GET", "/api/machines/52:54:00:00:00:00", {"headers": {"Authorization": f"Bearer {token}"}}),
    ]

    from requests.adapters import HTTPAdapter

    class FromOtherHost(HTTPAdapter):
        """The flood comes from another host: 127.0.0.2 (all of 127/8 is this machine)."""

        def init_poolmanager(self, *args, **kwargs):
            kwargs["source_address"] = ("127.0.0.2", 0)
            super().init_poolmanager(*args, **kwargs)

    def worker(k):
        s = requests.Session()
        s.mount("http://", FromOtherHost())
        i = k
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            method, path, kw = bad[i % len(bad)]
            s.request(method, url + path, timeout=30, **kw)
            i += 1
            with sent.get_lock():
                sent.value += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


ROUNDS, WINDOW = 6, 150


@pytest.mark.timeout(300)
def test_bad_request_flood_does_not_slow_dispatch(bastion, record):
    import multiprocessing as mp

    macs = [synthetic_mac(i, "52:54:0b") for i in range(20)]
    for m in macs:
        requests.post(bastion.url + "/api/discover", json={"mac": m, "hardware": {}})
    _dispatch_latencies(bastion.url, 50, macs)  # warm up
    ctx = mp.get_context("fork")
    stop, go, sent = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=_flood, args=(bastion.url, bastion.token, macs[0], stop, go, sent), daemon=True)
    proc.start()
    quiet, busy, flood_s = [], [], 0.0
    try:
        go.set()
        time.sleep(2)  # the flood spends its error budget: what remains is the steady state
        # Quiet and flood windows alternate, so that drift in this shared machine's speed falls on
        # both samples alike.
        for _ in range(ROUNDS):
            go.clear()
            time.sleep(0.2)
            quiet += _dispatch_latencies(bastion.url, WINDOW, macs)
            go.set()
            time.sleep(0.2)
            t0 = time.monotonic()
            busy += _dispatch_latencies(bastion.url, WINDOW, macs)
            flood_s += time.monotonic() - t0 + 0.2
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    # the flooder was answered 429, and a well-behaved host never is
    assert requests.get(bastion.url + "/healthz").status_code == 200
    ratio = {q: _pct(busy, q) / _pct(quiet, q) for q in (0.5, 0.9, 0.99)}
    record(**{f"dispatch_p{round(q * 100)}_{k}_ms": round(_pct(xs, q) * 1000, 1)
              for q in (0.5, 0.9, 0.99) for k, xs in (("quiet", quiet), ("flood", busy))},
           bad_requests=sent.value, bad_requests_per_s=round(sent.value / (flood_s + 2)),
           **{f"p{round(q * 100)}_ratio": round(r, 2) for q, r in ratio.items()})
    # p90, not p99: on this two-core machine the p99 of a few-millisecond request is scheduler noise
    # (quiet against quiet it moved 0.5x-2.6x), while p90 separates the cases: 0.90-1.24 with the
    # limiter, 1.72-2.45 with it switched off (LAB_BASTION_ERROR_RATE/BURST=1000000).
    assert ratio[0.9] <= 1.5, f"dispatch p90 {ratio[0.9]:.2f}x slower under a flood of bad requests"
