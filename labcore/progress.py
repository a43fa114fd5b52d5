"""One install timeline for both installers.

Fedora's Anaconda reports through the kickstart's ``curl`` callbacks (``POST /api/progress``) and
through its forwarded syslog; Ubuntu's subiquity reports through its ``reporting: webhook`` events
(curtin's stages inside). This module maps all of them onto the same stages, in this order:

    queued -> pxe -> partitioning -> packages -> post-install -> complete | failed

with a percentage where the source gives one (Anaconda's ``Installing foo (12/345)`` lines, the
known position of each subiquity/curtin step). It is pure: no I/O, no clock; the bastion decides
what to do with a :class:`Progress` (see ``bastion_app.logstore.advance``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: The stages of the timeline, in order. Terminal stages end the install.
STAGES = ("queued", "pxe", "partitioning", "packages", "post-install", "complete", "failed")
TERMINAL = frozenset({"complete", "failed"})
_ORDER = {s: i for i, s in enumerate(STAGES)}
_ORDER["failed"] = _ORDER["complete"]

#: Where each stage starts and ends on the 0-100 scale (a stage's own progress is placed inside).
SPAN = {
    "queued": (0, 0),
    "pxe": (0, 2),
    "partitioning": (2, 15),
    "packages": (15, 80),
    "post-install": (80, 99),
    "complete": (100, 100),
    "failed": (100, 100),
}

#: Stage names the kickstart callbacks, older templates or people use, and what they mean.
ALIASES = {
    "start": "pxe",
    "boot": "pxe",
    "installing": "pxe",
    "storage": "partitioning",
    "partition": "partitioning",
    "disk": "partitioning",
    "package": "packages",
    "payload": "packages",
    "software": "packages",
    "post": "post-install",
    "postinstall": "post-install",
    "post_install": "post-install",
    "bootloader": "post-install",
    "done": "complete",
    "completed": "complete",
    "success": "complete",
    "installed": "complete",
    "error": "failed",
    "fail": "failed",
    "failure": "failed",
    "stalled": "failed",
}


@dataclass(frozen=True)
class Progress:
    stage: str
    percent: int | None = None
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.stage in TERMINAL


def canonical_stage(stage: str | None) -> str | None:
    """The timeline stage a reported stage name belongs to. ``post-install-k3s`` (a sub-step of
    post-install) is ``post-install``; a name the timeline does not know is returned unchanged."""
    if not stage:
        return None
    s = stage.strip().lower()
    if s in _ORDER:
        return s
    if s in ALIASES:
        return ALIASES[s]
    for known in ("post-install", "partitioning", "packages"):
        if s.startswith(known + "-") or s.startswith(known + "."):
            return known
    return s


def overall(stage: str, fraction: float | None) -> int | None:
    """A stage plus how far into it (0..1) -> a percentage of the whole install."""
    if stage not in SPAN:
        return None
    lo, hi = SPAN[stage]
    if fraction is None:
        return lo
    return int(lo + (hi - lo) * min(1.0, max(0.0, fraction)))


def advances(current_stage: str | None, current_percent: int | None, new: Progress) -> bool:
    """Whether ``new`` moves the timeline forward from where the machine is (never backwards: a
    late or repeated line must not undo a later stage). Terminal stages always count."""
    if new.terminal:
        return True
    cur = canonical_stage(current_stage)
    if cur in TERMINAL:
        return False
    co, no = _ORDER.get(cur or "queued", 0), _ORDER.get(new.stage, -1)
    if no < 0:
        return False
    if no != co:
        return no > co
    return new.percent is not None and (current_percent is None or new.percent > current_percent)


# -- Anaconda (Fedora): lines from its forwarded syslog -------------------------------------------
_PKG_COUNT = re.compile(r"\bInstalling\s+\S+\s+\((\d{1,6})/(\d{1,6})\)")
_ANACONDA_RULES: list[tuple[re.Pattern[str], str, float | None]] = [
    (re.compile(r"Configuring storage|Creating (?:disklabel|\w+) on /dev/|Partitioning|Activating storage|storage configuration", re.I), "partitioning", 0.3),
    (re.compile(r"Running pre-installation (?:scripts|tasks)|Starting package installation|Preparing transaction|Downloading packages|Installing the software|Setting up the installation environment", re.I), "packages", 0.0),
    (re.compile(r"Performing post-installation setup tasks|Running post-installation scripts|Installing boot ?loader|Configuring installed system|Generating initramfs|Storing configuration files", re.I), "post-install", 0.3),
]


def from_anaconda_line(text: str) -> Progress | None:
    """A progress step from one of Anaconda's log lines, or None. Never a terminal stage: syslog
    is unauthenticated UDP, so only the installer's token-carrying callbacks end an install."""
    m = _PKG_COUNT.search(text)
    if m:
        done, total = int(m.group(1)), int(m.group(2))
        if 0 < total and done <= total:
            return Progress("packages", overall("packages", done / total), f"installing packages ({done}/{total})")
    for pattern, stage, frac in _ANACONDA_RULES:
        if pattern.search(text):
            return Progress(stage, overall(stage, frac), text.strip()[:200])
    return None


# -- subiquity (Ubuntu): reporting webhook events -------------------------------------------------
#: (event name fragment, stage, fraction into the stage); the first match wins, so the more
#: specific fragments come first. Names are subiquity's (``subiquity/Install/install/...``) and
#: curtin's (``cmd-install/stage-partitioning/...``).
_SUBIQUITY_STEPS: list[tuple[str, str, float]] = [
    ("/late", "post-install", 0.9),
    ("postinstall", "post-install", 0.4),
    ("final_system_configuration", "post-install", 0.7),
    ("downloading_and_installing_security_updates", "post-install", 0.5),
    ("stage-final", "post-install", 0.6),
    ("curthooks", "packages", 0.6),
    ("stage-curthooks", "packages", 0.6),
    ("installing_kernel", "packages", 0.7),
    ("configuring_apt", "packages", 0.1),
    ("extract", "packages", 0.2),
    ("stage-extract", "packages", 0.2),
    ("partitioning", "partitioning", 0.3),
    ("stage-partitioning", "partitioning", 0.3),
    ("cmd-block-meta", "partitioning", 0.3),
    ("stage-network", "partitioning", 0.9),
    ("subiquity/install", "partitioning", 0.0),
]


def from_subiquity_event(event: dict[str, Any]) -> Progress | None:
    """A progress step from one subiquity/curtin reporting event, or None for the many events that
    say nothing about progress. A failed result of an install step fails the install; the start
    of the shutdown (the reboot into the installed system) completes it."""
    name = str(event.get("name") or "")
    etype = str(event.get("event_type") or "")
    result = str(event.get("result") or "").upper()
    desc = str(event.get("description") or "")[:200]
    low = name.lower()
    if etype == "finish" and result == "FAIL" and ("install" in low or "curtin" in low or low.startswith("cmd-")):
        return Progress("failed", None, f"{name}: {desc}".strip(": ") or "installer step failed")
    if low.startswith("subiquity/shutdown") and etype == "start":
        return Progress("complete", 100, "installer finished; rebooting into the installed system")
    if etype not in ("start", "finish"):
        return None
    for fragment, stage, frac in _SUBIQUITY_STEPS:
        if fragment in low:
            if etype == "finish":
                frac = min(1.0, frac + 0.1)
            return Progress(stage, overall(stage, frac), desc or name)
    return None
