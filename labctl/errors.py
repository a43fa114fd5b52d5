"""labctl's errors: ONE base class carrying an exit code; `main.main` turns it into one clean line.

Exit codes are listed in EXIT_CODES (docs/cli.md shows them).
"""

from __future__ import annotations

#: exit code -> meaning. The single source for docs/cli.md's table.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error (a 5xx from the bastion, a local failure); rerun with --debug",
    2: "usage or invalid input (bad flag, failed validation, HTTP 400/422, ambiguous target); nothing was sent or changed",
    3: "bastion unreachable (connection refused, DNS, timeout) or the URL is not a lab-platform bastion",
    4: "not authorised (HTTP 401/403): missing or wrong token",
    5: "not found (HTTP 404, unknown target)",
    6: "conflict (HTTP 409): the action is not allowed in the machine's current state",
    7: "install failed, stalled or timed out (logs -f, install --wait)",
    8: "doctor found a failing check",
    9: "playbook timed out or was cancelled (ansible-runner status timeout/canceled)",
    130: "interrupted (Ctrl-C)",
}
#: a failed playbook exits with PLAYBOOK_RC_BASE + ansible-playbook's rc (e.g. 12 = a host failed, 14 = unreachable)
PLAYBOOK_RC_BASE = 10


class LabctlError(Exception):
    """An error shown to the operator as one line ("labctl: error: ...") plus an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


def _error_class(name: str, exit_code: int) -> type[LabctlError]:
    """A LabctlError that differs from the others only by its exit code (documented by EXIT_CODES)."""
    return type(name, (LabctlError,), {"exit_code": exit_code, "__module__": __name__, "__doc__": EXIT_CODES[exit_code]})


UsageError = _error_class("UsageError", 2)
Unreachable = _error_class("Unreachable", 3)
Unauthorized = _error_class("Unauthorized", 4)
NotFound = _error_class("NotFound", 5)
Conflict = _error_class("Conflict", 6)
InstallFailed = _error_class("InstallFailed", 7)
ChecksFailed = _error_class("ChecksFailed", 8)


class PlaybookFailed(LabctlError):
    """ansible-runner's status/rc as an exit code: failed -> 10 + rc; timeout/canceled -> 9."""

    def __init__(self, message: str, status: str, rc: int, hint: str | None = None):
        code = 9 if status in ("timeout", "canceled") else PLAYBOOK_RC_BASE + max(1, min(rc, 99))
        super().__init__(message, hint, exit_code=code)
        self.status, self.rc = status, rc
