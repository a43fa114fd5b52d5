"""The lifecycle table: every legal transition, every illegal one, and the dispatch order."""

import itertools

import pytest

from labcore.lifecycle import (
    TRANSITIONS,
    Action,
    BootMode,
    IllegalTransition,
    State,
    allowed_actions,
    boot_mode,
    changed_params,
    describe_changes,
    transition,
)

EXPECTED = {
    ("discover", "unknown"): "discovered",
    ("install", "discovered"): "install_queued",
    ("install", "failed"): "install_queued",
    ("install", "install_queued"): "install_queued",
    ("start", "install_queued"): "installing",
    ("start", "installing"): "installing",
    ("progress", "install_queued"): "installing",
    ("progress", "installing"): "installing",
    ("complete", "installing"): "installed",
    ("complete", "install_queued"): "installed",
    ("fail", "installing"): "failed",
    ("fail", "install_queued"): "failed",
    ("stall", "installing"): "failed",
    ("cancel", "install_queued"): "discovered",
    ("cancel", "installing"): "discovered",
    ("cancel", "failed"): "discovered",
    ("reprovision", "installed"): "install_queued",
    ("forget", "discovered"): "removed",
    ("forget", "install_queued"): "removed",
    ("forget", "installing"): "removed",
    ("forget", "installed"): "removed",
    ("forget", "failed"): "removed",
}


def test_table_is_exactly_the_documented_lifecycle():
    assert {(a.value, s.value): t.value for (a, s), t in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize("action,state", sorted(EXPECTED))
def test_legal(action, state):
    assert transition(state, action) == State(EXPECTED[(action, state)])


ILLEGAL = sorted(
    (a.value, s.value)
    for a, s in itertools.product(Action, State)
    if (a.value, s.value) not in EXPECTED
)


@pytest.mark.parametrize("action,state", ILLEGAL)
def test_illegal(action, state):
    with pytest.raises(IllegalTransition) as exc:
        transition(state, action)
    assert action in str(exc.value) and state in str(exc.value)


def test_illegal_message_lists_what_is_allowed():
    with pytest.raises(IllegalTransition, match=r"allowed: .*reprovision"):
        transition("installed", "install")
    assert set(allowed_actions("installed")) == {Action.REPROVISION, Action.FORGET}


@pytest.mark.parametrize(
    "state,debug,expected",
    [
        (None, None, BootMode.DISCOVER),
        ("discovered", None, BootMode.DISCOVER),
        ("failed", None, BootMode.DISCOVER),
        ("install_queued", None, BootMode.INSTALL),
        ("installing", None, BootMode.INSTALL),
        ("installed", None, BootMode.LOCAL),
        ("installed", "rescue", BootMode.DEBUG),
        ("install_queued", "rescue", BootMode.DEBUG),
        (None, "rescue", BootMode.DEBUG),
        ("discovered", "pxe", BootMode.PXE_DEBUG),
    ],
)
def test_boot_mode_order(state, debug, expected):
    assert boot_mode(state, debug) == expected


def test_changed_params_and_their_description():
    before = {"hostname": "n1", "role": "worker", "os": "fedora-43", "disk": "", "ip": "10.0.0.1"}
    assert changed_params(None, before) == {} and changed_params({"hostname": None}, before) == {}  # a first install
    assert changed_params(before, {**before, "ip": "10.0.0.2"}) == {}  # only the install parameters count
    diff = changed_params(before, {**before, "role": "infra", "disk": "/dev/sda"})
    assert diff == {"role": ["worker", "infra"], "disk": ["", "/dev/sda"]}
    assert describe_changes(diff) == "role worker -> infra, disk (auto) -> /dev/sda" and describe_changes({}) == ""
