"""Fixtures for the lab.platform collection tests: a real `lab-bastion serve` and the collection on
ANSIBLE_COLLECTIONS_PATH (a symlink to this checkout). The helpers that run the real ansible CLIs
are in tests/support.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import start_bastion
from tests.vm.ansible import collections_path


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> Path:
    return collections_path(tmp_path_factory.mktemp("collections"))


@pytest.fixture(scope="module")
def lab_bastion(tmp_path_factory):
    b = start_bastion(tmp_path_factory.mktemp("bastion") / "data", workers=2)
    yield b
    b.stop()


# The molecule scenarios' testinfra checks run on the VM through molecule (test_molecule.py), not here.
collect_ignore_glob = ["molecule/*"]
