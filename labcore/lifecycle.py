"""The machine lifecycle: ONE table of allowed transitions.

Every change of a machine's state goes through :func:`transition`; the store records each one as
an event (who, when, from, to, why). An action that is not in the table for the current state is
an :class:`IllegalTransition` (HTTP 409), never a silent overwrite.

    unknown --discover--> discovered --install--> install_queued --start--> installing --complete--> installed
    install_queued/installing/failed --cancel--> discovered
    installing --fail|stall--> failed --install--> install_queued
    installed --reprovision--> install_queued
    any --forget--> (removed)
    debug is not a state: a one-shot flag served once by /dispatch, then the machine is where it was.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    UNKNOWN = "unknown"  # not in the store (never stored)
    DISCOVERED = "discovered"
    INSTALL_QUEUED = "install_queued"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"
    REMOVED = "removed"  # the result of forget (never stored)


class Action(StrEnum):
    DISCOVER = "discover"  # hardware inventory from an unknown machine
    INSTALL = "install"  # operator queues an install
    START = "start"  # the machine fetched its install script (or sent its first progress)
    PROGRESS = "progress"  # a progress report during the install
    COMPLETE = "complete"  # the installer reported success
    FAIL = "fail"  # the installer reported failure
    STALL = "stall"  # nothing heard from the install for too long
    CANCEL = "cancel"  # operator withdraws a queued/running/failed install
    REPROVISION = "reprovision"  # operator reinstalls an installed machine
    FORGET = "forget"  # operator removes the machine from all state


S, A = State, Action

#: (action, from_state) -> to_state. The only place that says what may happen.
TRANSITIONS: dict[tuple[Action, State], State] = {
    (A.DISCOVER, S.UNKNOWN): S.DISCOVERED,
    (A.INSTALL, S.DISCOVERED): S.INSTALL_QUEUED,
    (A.INSTALL, S.FAILED): S.INSTALL_QUEUED,
    (A.INSTALL, S.INSTALL_QUEUED): S.INSTALL_QUEUED,  # change the parameters of a queued install
    (A.START, S.INSTALL_QUEUED): S.INSTALLING,
    (A.START, S.INSTALLING): S.INSTALLING,  # the installer rebooted into PXE again
    (A.PROGRESS, S.INSTALL_QUEUED): S.INSTALLING,
    (A.PROGRESS, S.INSTALLING): S.INSTALLING,
    (A.COMPLETE, S.INSTALLING): S.INSTALLED,
    (A.COMPLETE, S.INSTALL_QUEUED): S.INSTALLED,  # a fast install whose earlier posts were lost
    (A.FAIL, S.INSTALLING): S.FAILED,
    (A.FAIL, S.INSTALL_QUEUED): S.FAILED,
    (A.STALL, S.INSTALLING): S.FAILED,
    (A.CANCEL, S.INSTALL_QUEUED): S.DISCOVERED,
    (A.CANCEL, S.INSTALLING): S.DISCOVERED,
    (A.CANCEL, S.FAILED): S.DISCOVERED,
    (A.REPROVISION, S.INSTALLED): S.INSTALL_QUEUED,
    **{(A.FORGET, s): S.REMOVED for s in (S.DISCOVERED, S.INSTALL_QUEUED, S.INSTALLING, S.INSTALLED, S.FAILED)},
}

#: States in which the machine holds a valid install token (progress and log posts are accepted).
INSTALL_TOKEN_STATES = frozenset({S.INSTALL_QUEUED, S.INSTALLING})
#: States stored in the database.
STORED_STATES = tuple(s for s in State if s not in (S.UNKNOWN, S.REMOVED))


class IllegalTransition(Exception):
    """The action is not allowed from the machine's current state (HTTP 409)."""

    def __init__(self, action: Action, current: State):
        self.action = Action(action)
        self.current = State(current)
        allowed = sorted(a.value for (a, s) in TRANSITIONS if s == self.current)
        super().__init__(
            f"cannot {self.action.value} a machine that is {self.current.value}"
            + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        )


def transition(current: State | str, action: Action | str) -> State:
    """Return the state that ``action`` leads to from ``current``, or raise IllegalTransition."""
    cur, act = State(current), Action(action)
    try:
        return TRANSITIONS[(act, cur)]
    except KeyError:
        raise IllegalTransition(act, cur) from None


def allowed_actions(current: State | str) -> list[Action]:
    cur = State(current)
    return [a for (a, s) in TRANSITIONS if s == cur]


#: The install parameters an operator chooses that a re-queue can change (SSH keys are not shown).
INSTALL_PARAMS = ("hostname", "role", "os", "disk")


def changed_params(before: dict | None, after: dict) -> dict[str, list]:
    """``{param: [before, after]}`` for each install parameter that a (re)queue changes on a machine
    that already had one; empty for a first install or an identical re-queue."""
    return {k: [before[k], after[k]] for k in INSTALL_PARAMS
            if before and before.get(k) is not None and after.get(k) is not None and before[k] != after[k]}


def describe_changes(changes: dict[str, list]) -> str:
    """``role worker -> infra, disk (auto) -> /dev/sda`` (empty when nothing changed)."""
    return ", ".join(f"{k} {a or '(auto)'} -> {b or '(auto)'}" for k, (a, b) in changes.items())


class BootMode(StrEnum):
    DISCOVER = "discover"
    INSTALL = "install"
    DEBUG = "debug"  # rescue environment (Anaconda inst.rescue + inst.sshd)
    PXE_DEBUG = "pxe-debug"  # iPXE diagnostics and shell
    LOCAL = "local-boot"


def boot_mode(state: State | str | None, debug_mode: str | None) -> BootMode:
    """What /dispatch serves, in DESIGN order: a pending one-shot debug, then an install, then
    local boot for an installed machine, then discovery for everything else."""
    if debug_mode:
        return BootMode.PXE_DEBUG if debug_mode == "pxe" else BootMode.DEBUG
    st = State(state) if state else State.UNKNOWN
    if st in (State.INSTALL_QUEUED, State.INSTALLING):
        return BootMode.INSTALL
    if st == State.INSTALLED:
        return BootMode.LOCAL
    return BootMode.DISCOVER
