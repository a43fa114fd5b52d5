"""Operator mistakes while serving (issue 15 finding 5): state.db deleted under a running bastion.
/healthz must say so, and every request that needs the state must fail the same way (503, nothing
changed) instead of some workers writing into the deleted file and others into a new empty one.
(Start-up mistakes, a taken port or an unusable data directory: tests/integration/test_serve_startup.py.)"""

from __future__ import annotations

import requests

from tests.support import start_bastion, synthetic_mac


def test_deleted_state_db_fails_loudly_and_consistently(tmp_path, record):
    b = start_bastion(tmp_path / "data", workers=2)
    try:
        s = b.session()
        for i in range(8):  # every worker thread that will be asked has a connection open
            assert s.post(b.url + "/api/discover", json={"mac": synthetic_mac(i, "52:54:0d")}).status_code == 200
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            (b.data_dir / name).unlink(missing_ok=True)
        health = [requests.get(b.url + "/healthz", timeout=10) for _ in range(20)]
        writes = [requests.post(b.url + "/api/discover", json={"mac": synthetic_mac(100 + i, "52:54:0d")}, timeout=10)
                  for i in range(40)]
        reads = [s.get(b.url + "/api/machines", timeout=10) for _ in range(20)]
        recreated = (b.data_dir / "state.db").exists()
        log = b.log()
    finally:
        b.stop()
    assert [r.status_code for r in health] == [503] * 20
    assert all("state.db" in r.json()["detail"] for r in health)
    assert [r.status_code for r in writes] == [503] * 40
    assert all(r.json()["error"].startswith("storage unavailable") and "state.db" in r.json()["error"] for r in writes)
    assert [r.status_code for r in reads] == [503] * 20
    assert not recreated, "a worker created a new, empty state.db"
    assert "Traceback" not in log
    record(healthz_503=20, writes_refused=40, reads_refused=20, accepted=0)
