"""schemathesis against /api/openapi.json of a running `lab-bastion serve`, with and without the
operator token: no 5xx, every response matches the spec (status, content type, schema, headers),
auth is not ignored, invalid input is rejected and valid input accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import run_schemathesis, start_bastion


def _schemathesis(bastion, tmp_path: Path, *headers: str, max_examples: int, seed: str = "1"):
    return run_schemathesis(f"{bastion.url}/api/openapi.json", tmp_path, *headers, max_examples=max_examples, seed=seed)


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    """A bastion whose budgets (429 for hosts that keep failing, alone or all together, and for
    hosts that invent machines) are out of the fuzzer's way, so that every generated request
    reaches the code it is meant to test."""
    b = start_bastion(tmp_path_factory.mktemp("fuzz") / "data", env={
        f"LAB_BASTION_{name}": "100000" for name in ("ERROR_RATE", "ERROR_BURST", "ERROR_TOTAL_RATE", "ERROR_TOTAL_BURST",
                                                     "DISCOVER_RATE", "DISCOVER_BURST")})
    yield b
    b.stop()


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_schemathesis(bastion, tmp_path, record, with_token):
    # a known machine, so that the operations on a MAC reach their logic and not only 404
    import requests

    requests.post(bastion.url + "/api/discover", json={"mac": "52:54:00:12:34:56", "hardware": {}})
    headers = [f"Authorization: Bearer {bastion.token}"] if with_token else []
    # without the token nearly everything is a 401: a few examples per operation show that
    rc, out, generated = _schemathesis(bastion, tmp_path, *headers, max_examples=10 if with_token else 3)
    if rc != 0 and "Runtime Error" in out and "Failures:" not in out:
        # schemathesis' own generator occasionally crashes (hypothesis "AST constructor recursion");
        # that is not a finding about the bastion: run once more with another seed
        rc, out, generated = _schemathesis(bastion, tmp_path, *headers, max_examples=10 if with_token else 3, seed="2")
    tail = "\n".join(out.splitlines()[-60:])
    assert rc == 0, f"schemathesis found problems:\n{tail}"
    assert generated > (500 if with_token else 100), tail
    assert "Traceback" not in bastion.log()
    record(test_cases=generated, failures=0, server_errors=0)
