"""ansible-runner glue: every host-changing labctl command runs an Ansible playbook through
:func:`run_playbook`, so the same step works from AWX, Semaphore or plain ansible-playbook.

Usage (other command modules)::

    from labctl import runner

    result = runner.run_playbook(
        runner.playbook_path("reprovision.yml"),       # a playbook of the lab.platform collection
        inventory=runner.inventory({"node1": {"ansible_host": "10.0.0.5"}}),
        extravars={"lab_bastion_url": url},
        name="reprovision-node1",
    )
    runner.check(result)      # raises PlaybookFailed (exit code 10 + rc, or 9) unless successful

While it runs, each task prints one line per host (ok / changed / failed / skipped / unreachable)
and at the end a summary ``ok=N changed=N failed=N unreachable=N skipped=N``. The run's private
data directory (inventory, env, artifacts with the job events and stdout) is kept under
``~/.labctl/runs/<time>-<name>/`` and its path is printed, so a failure can be read afterwards.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl import config, errors, output

#: the source tree labctl runs from; it is the lab.platform collection when it has galaxy.yml
REPO = Path(__file__).resolve().parents[1]
#: the copy of the collection that ships in the wheel (setup.py puts it there); absent in a checkout
BUNDLED = Path(__file__).resolve().parent / "collection"
COLLECTION = Path("ansible_collections", "lab", "platform")
#: where labctl looks for the collection's playbooks, in order
PLAYBOOK_DIRS_ENV = "LABCTL_PLAYBOOK_DIR"
_STAT_KEYS = {"ok": "ok", "changed": "changed", "failures": "failed", "dark": "unreachable", "skipped": "skipped"}
_HOST_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipping",
    "runner_on_unreachable": "unreachable",
    "runner_item_on_failed": "failed",
}


@dataclass
class RunResult:
    """What a playbook run ended with: runner status (successful, failed, timeout, canceled), the
    ansible-playbook rc, per-category host counts and the kept artefacts directory."""

    status: str
    rc: int
    stats: dict[str, int] = field(default_factory=dict)
    run_dir: Path | None = None
    failures: list[str] = field(default_factory=list)  # "failed: host: msg" lines, also of a quiet run

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0

    @property
    def exit_code(self) -> int:
        if self.ok:
            return 0
        return errors.PlaybookFailed("", self.status, self.rc).exit_code


def runs_dir() -> Path:
    return config.home() / "runs"


def _has_collection(base: Path) -> bool:
    return (base / COLLECTION).is_dir()


def _env_collection_paths() -> list[Path]:
    """ANSIBLE_COLLECTIONS_PATH's entries as bases (ansible also accepts a path that ends in
    ansible_collections)."""
    out = []
    for entry in os.environ.get("ANSIBLE_COLLECTIONS_PATH", "").split(os.pathsep):
        if entry:
            p = Path(entry).expanduser()
            out.append(p.parent if p.name == "ansible_collections" else p)
    return out


def collection_base() -> Path:
    """The directory that holds the lab.platform collection labctl runs (``<base>/ansible_collections/
    lab/platform``), in order: the source tree labctl runs from (linked, :func:`link_collection`), a
    collection installed on ANSIBLE_COLLECTIONS_PATH, the copy that ships in the wheel (:data:`BUNDLED`)."""
    if (REPO / "galaxy.yml").is_file():
        return link_collection(runs_dir().parent / "collections")
    for base in [*_env_collection_paths(), BUNDLED]:
        if _has_collection(base):
            return base
    raise errors.LabctlError(
        "the lab.platform collection was not found (not on ANSIBLE_COLLECTIONS_PATH, and this labctl has no copy)",
        "reinstall lab-platform, or `ansible-galaxy collection install` lab.platform and set ANSIBLE_COLLECTIONS_PATH")


def playbook_path(name: str) -> Path:
    """A playbook of the lab.platform collection: $LABCTL_PLAYBOOK_DIR, else the collection's
    playbooks/ (:func:`collection_base`)."""
    candidates = []
    if os.environ.get(PLAYBOOK_DIRS_ENV):
        candidates.append(Path(os.environ[PLAYBOOK_DIRS_ENV]))
    candidates.append(collection_base() / COLLECTION / "playbooks")
    for d in candidates:
        if (d / name).is_file():
            return d / name
    raise errors.LabctlError(f"playbook {name} not found (looked in {', '.join(str(c) for c in candidates)})",
                             f"install the lab.platform collection or set {PLAYBOOK_DIRS_ENV}")


def link_collection(base: Path, source: Path = REPO) -> Path:
    """Make ``base/ansible_collections/lab/platform`` a symlink to *source* (a checkout: the
    repository is the collection) and return *base*, for ANSIBLE_COLLECTIONS_PATH. A link to another
    checkout is replaced, atomically, so a moved or second clone never runs a stale collection."""
    link = base / COLLECTION
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and Path(os.readlink(link)) != source:
        link.unlink(missing_ok=True)
    if not link.exists():
        tmp = link.with_name(f".platform-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(source)
        tmp.rename(link)
    return base


def collections_env() -> dict[str, str]:
    """ANSIBLE_COLLECTIONS_PATH for a run: the base of the collection labctl uses
    (:func:`collection_base`) first, then whatever the environment already names."""
    paths = [str(collection_base())]
    paths += [p for p in os.environ.get("ANSIBLE_COLLECTIONS_PATH", "").split(os.pathsep) if p and p not in paths]
    return {"ANSIBLE_COLLECTIONS_PATH": os.pathsep.join(paths)}


def inventory(hosts: dict[str, dict[str, Any]], group: str = "targets") -> dict[str, Any]:
    """A YAML-shaped inventory: {host: hostvars} in one group (and in all)."""
    return {"all": {"children": {group: {"hosts": hosts}}}}


class _Printer:
    """Live per-task progress from ansible-runner's job events."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.console = output.console()
        self.failures: list[str] = []

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data", {})
        if self.quiet and kind not in _HOST_EVENTS:
            return True
        if kind == "playbook_on_play_start":
            self.console.print(f"PLAY [{data.get('play', '')}]", markup=False, highlight=False)
        elif kind == "playbook_on_task_start":
            self.console.print(f"  TASK [{data.get('task', '')}]", markup=False, highlight=False)
        elif kind in _HOST_EVENTS:
            res = data.get("res") or {}
            status = _HOST_EVENTS[kind]
            if status == "ok" and res.get("changed"):
                status = "changed"
            line = f"    {status}: {data.get('host', '?')}"
            msg = res.get("msg") if status in ("failed", "unreachable") else None
            if msg:
                line += f": {str(msg).splitlines()[0][:300]}"
            if status in ("failed", "unreachable"):
                self.failures.append(line.strip())
            if self.quiet:
                return True
            self.console.print(line, markup=False, highlight=False,
                               style={"failed": "red", "unreachable": "red", "changed": "yellow"}.get(status))
        return True


#: Environment variables that hold secrets; never handed to a playbook run (nor its artefacts).
SECRET_ENV = ("LABCTL_TOKEN", "LAB_BASTION_TOKEN", "LAB_BASTION_JOIN_TOKEN")


def run_playbook(playbook: str | os.PathLike, *, inventory: dict[str, Any] | str, extravars: dict[str, Any] | None = None,
                 name: str = "run", limit: str | None = None, timeout: int | None = None, quiet: bool = False,
                 envvars: dict[str, str] | None = None, verbosity: int = 0, check_mode: bool = False) -> RunResult:
    """Run ``playbook`` with ansible-runner and return a :class:`RunResult` (it never raises for a
    failed play: call :func:`check` or use ``result.exit_code``).

    ``inventory`` is a dict (see :func:`inventory`) or an inventory source path/string; ``timeout``
    in seconds makes the run end with status ``timeout``. Artefacts stay in ``result.run_dir``.
    The lab.platform collection is the one :func:`collection_base` finds (:func:`collections_env`);
    ``envvars`` add to or override the run's environment; ``check_mode`` runs with --check --diff.
    Secrets in labctl's own environment (:data:`SECRET_ENV`) are kept out of the run: ansible-runner
    writes the whole environment into the artefacts.
    """
    import ansible_runner

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60] or "run"
    run_dir = runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bindir = str(Path(sys.executable).parent)
    env = {"PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOST_KEY_CHECKING": os.environ.get("ANSIBLE_HOST_KEY_CHECKING", "False"),
           **collections_env(), **(envvars or {})}
    printer = _Printer(quiet)
    old_path = os.environ.get("PATH", "")
    hidden = {k: os.environ.pop(k) for k in SECRET_ENV if k in os.environ}
    os.environ["PATH"] = env["PATH"]  # ansible-runner looks up ansible-playbook on this PATH
    try:
        r = ansible_runner.run(
            private_data_dir=str(run_dir), playbook=str(Path(playbook).resolve()), inventory=inventory,
            extravars=extravars or {}, limit=limit, envvars=env, quiet=True, event_handler=printer,
            timeout=timeout, verbosity=verbosity, json_mode=False, rotate_artifacts=0,
            cmdline="--check --diff" if check_mode else None,
        )
    finally:
        os.environ["PATH"] = old_path
        os.environ.update(hidden)
    totals = {v: 0 for v in _STAT_KEYS.values()}
    for key, per_host in (r.stats or {}).items():
        if key in _STAT_KEYS:
            totals[_STAT_KEYS[key]] += sum(per_host.values())
    result = RunResult(status=r.status, rc=int(r.rc if r.rc is not None else 1), stats=totals, run_dir=run_dir,
                       failures=printer.failures)
    if not quiet:
        summary = " ".join(f"{k}={v}" for k, v in totals.items())
        output.console().print(f"{summary}  (status {result.status}, rc {result.rc}; artefacts in {run_dir})",
                               markup=False, highlight=False)
    return result


def check(result: RunResult, what: str = "the playbook") -> RunResult:
    """Raise PlaybookFailed (exit code 10 + rc for failed, 9 for timeout/canceled) unless the run
    succeeded; return the result otherwise."""
    if result.ok:
        return result
    raise errors.PlaybookFailed(
        f"{what} ended {result.status} (ansible rc {result.rc}; "
        f"failed={result.stats.get('failed', 0)} unreachable={result.stats.get('unreachable', 0)})"
        + (f"; {result.failures[0]}" if result.failures else ""),
        result.status, result.rc,
        hint=f"read {result.run_dir}/artifacts/*/stdout for the full output")
