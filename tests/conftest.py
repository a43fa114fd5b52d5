"""Shared fixtures (the helpers they wrap live in tests/support.py).

- ``app`` / ``client``: the Flask app on a temporary data dir (unit tests of routes).
- ``bastion``: a real ``lab-bastion serve --no-dnsmasq`` (gunicorn, several workers) on a free
  loopback port, stopped at the end of the test module.
- ``postgres`` / ``labd_db``: one real PostgreSQL 15 per session; a fresh database per test,
  cloned from a template that labd's migrations ran on once.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.support import start_bastion, start_postgres


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def app(data_dir):
    from bastion_app import create_app
    from labcore import bastion_config as configmod

    cfg = configmod.load(data_dir, overrides={"listen": "127.0.0.1:8080", "server_ip": "192.0.2.1",
                                              "subnet": "192.0.2.0/24", "dnsmasq": False}, env={}, detect=False)
    app = create_app(cfg, {"TESTING": True})
    yield app
    app.extensions["lab_store"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth(app) -> dict[str, str]:
    return {"Authorization": f"Bearer {app.config['LAB_TOKEN']}"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    b = start_bastion(tmp_path_factory.mktemp("bastion") / "data")
    yield b
    b.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One PostgreSQL 15 server for the whole session, with a template database ``labd_template``
    migrated once (labd's schema), cloned by ``labd_db``."""
    from labd import migrations

    pg = start_postgres()
    try:
        pg.sql("CREATE DATABASE labd_template")
        migrations.migrate(pg.url("labd_template"))
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def labd_db(postgres, request) -> str:
    """The URL of a fresh database for this test, cloned from the migrated template."""
    name = "t_" + uuid.uuid4().hex[:16]
    postgres.sql(f"CREATE DATABASE {name} TEMPLATE labd_template")
    return postgres.url(name)
