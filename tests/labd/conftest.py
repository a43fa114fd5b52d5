"""labd's fixtures: one real `labd serve` (gunicorn, HTTPS) per session on a database of its own,
cloned from the session PostgreSQL's migrated template (tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.support import serve_labd


@pytest.fixture(scope="session")
def labd(postgres, tmp_path_factory):
    yield from serve_labd(postgres, tmp_path_factory, "labd_http")


@pytest.fixture(scope="session")
def admin(labd):
    """A session with the admin's API token."""
    return labd.session(labd.login())
