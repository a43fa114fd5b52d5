"""Following a command labd sent to an agent (`labctl exec`, `labctl logs HOST`) or to a bastion
(`labctl provision logs` with a labd context).

A command is created with one request and then followed by polling its output
(``GET /api/v1/commands/<id>?after=N``): no connection is held open across labd's workers, and a
dropped request is simply sent again. Ctrl-C cancels the remote command (the agent kills its
process group; the bastion stops its log follow) and re-raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from labctl import errors

POLL_SECONDS = 0.2
TIMEOUT_EXIT = 124  # like timeout(1)


def follow(client: Any, cid: str, on_row: Callable[[dict], None], *, deadline: float | None = None,
           poll: float = POLL_SECONDS) -> dict:
    """Hand each output row (``{"seq", "stream", "data"}``) to ``on_row`` as it arrives, until the
    command ends; returns the final command. Past ``deadline`` (time.monotonic()) the command is
    cancelled and labctl exits 124; Ctrl-C cancels it and re-raises."""
    after = 0
    try:
        while True:
            c = client.get(f"/api/v1/commands/{cid}", after=after)
            for row in c["output"]:
                on_row(row)
            after = c["next_after"]
            if c["state"] not in ("queued", "sent") and not c["output"]:
                return c
            if deadline is not None and time.monotonic() > deadline:
                client.post(f"/api/v1/commands/{cid}/cancel")
                raise errors.LabctlError("no answer within the timeout; the command was cancelled",
                                         exit_code=TIMEOUT_EXIT)
            if not c["output"]:
                time.sleep(poll)
    except KeyboardInterrupt:
        client.post(f"/api/v1/commands/{cid}/cancel")
        raise
