"""The one install timeline: Anaconda lines, subiquity/curtin events and callback stage names map
onto the same stages; the timeline never goes backwards."""

from __future__ import annotations

import pytest

from labcore.progress import (
    STAGES,
    Progress,
    advances,
    canonical_stage,
    from_anaconda_line,
    from_subiquity_event,
    overall,
)


@pytest.mark.parametrize("raw,expected", [
    ("partitioning", "partitioning"), ("post-install", "post-install"), ("post-install-k3s", "post-install"),
    ("postinstall", "post-install"), ("post", "post-install"), ("packages", "packages"), ("payload", "packages"),
    ("complete", "complete"), ("done", "complete"), ("error", "failed"), ("failed", "failed"),
    ("stalled", "failed"), ("something-new", "something-new"), (None, None), ("", None),
])
def test_canonical_stage(raw, expected):
    assert canonical_stage(raw) == expected


def test_anaconda_package_count_gives_exact_percent():
    p = from_anaconda_line("Installing bash-5.2.26-3.fc43.x86_64 (50/200)")
    assert p == Progress("packages", overall("packages", 0.25), "installing packages (50/200)")
    assert 15 < p.percent < 80
    assert from_anaconda_line("Installing x (300/200)") is None  # nonsense count: no step


@pytest.mark.parametrize("line,stage", [
    ("Configuring storage", "partitioning"),
    ("Creating xfs on /dev/vda2", "partitioning"),
    ("Creating disklabel on /dev/nvme0n1", "partitioning"),
    ("Starting package installation process", "packages"),
    ("Downloading packages", "packages"),
    ("Running post-installation scripts", "post-install"),
    ("Installing boot loader", "post-install"),
    ("Generating initramfs", "post-install"),
])
def test_anaconda_lines(line, stage):
    p = from_anaconda_line(line)
    assert p is not None and p.stage == stage and not p.terminal


@pytest.mark.parametrize("line", ["Thank you for installing Fedora", "Traceback (most recent call last):",
                                   "Installation complete", "random chatter", ""])
def test_anaconda_lines_never_end_an_install(line):
    p = from_anaconda_line(line)
    assert p is None or not p.terminal


@pytest.mark.parametrize("name,etype,stage", [
    ("subiquity/Install/install/partitioning", "start", "partitioning"),
    ("cmd-install/stage-partitioning/builtin/cmd-block-meta", "start", "partitioning"),
    ("subiquity/Install/install/extract", "start", "packages"),
    ("cmd-install/stage-extract/builtin/cmd-extract", "finish", "packages"),
    ("subiquity/Install/install/curthooks", "start", "packages"),
    ("subiquity/Install/install/postinstall", "start", "post-install"),
    ("subiquity/Install/install/final_system_configuration", "start", "post-install"),
    ("subiquity/Late/run", "start", "post-install"),
])
def test_subiquity_steps(name, etype, stage):
    p = from_subiquity_event({"name": name, "event_type": etype, "description": "d", "result": "SUCCESS"})
    assert p is not None and p.stage == stage
    lo, hi = {"partitioning": (2, 15), "packages": (15, 80), "post-install": (80, 99)}[stage]
    assert lo <= p.percent <= hi


def test_subiquity_terminal_events():
    fail = from_subiquity_event({"name": "subiquity/Install/install/curthooks", "event_type": "finish",
                                 "result": "FAIL", "description": "curtin command curthooks"})
    assert fail is not None and fail.stage == "failed" and fail.terminal
    done = from_subiquity_event({"name": "subiquity/Shutdown/shutdown", "event_type": "start"})
    assert done == Progress("complete", 100, done.message)
    assert from_subiquity_event({"name": "subiquity/Keyboard/apply", "event_type": "start"}) is None
    assert from_subiquity_event({"name": "subiquity/Install/install/partitioning", "event_type": "progress"}) is None
    assert from_subiquity_event({}) is None


def test_advances_only_forward():
    assert advances("pxe", 0, Progress("partitioning", 5))
    assert advances("packages", 30, Progress("packages", 40))
    assert not advances("packages", 40, Progress("packages", 40))
    assert not advances("packages", 40, Progress("packages", 30))
    assert not advances("post-install", 85, Progress("packages", 70))
    assert not advances("post-install-k3s", 85, Progress("partitioning", 10))  # aliases count
    assert not advances("complete", 100, Progress("post-install", 90))
    assert advances("packages", 40, Progress("failed"))
    assert advances(None, None, Progress("pxe", 0))  # nothing yet (queued) -> pxe is forward
    assert advances("queued", 0, Progress("pxe", 1))


def test_stage_order_and_spans_are_consistent():
    assert STAGES.index("partitioning") < STAGES.index("packages") < STAGES.index("post-install") < STAGES.index("complete")
    last = -1
    for s in ("pxe", "partitioning", "packages", "post-install", "complete"):
        assert overall(s, 0.0) >= last
        last = overall(s, 1.0)
    assert overall("unknown", 0.5) is None
