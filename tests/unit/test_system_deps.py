"""Every program the project runs on the host is installed by the project's own files.

The programs are found where they are called: the first word of every command line that tests,
benchmarks and the commands hand to ``subprocess`` (a list literal, or a name bound to one), the
``sh(...)``-style helpers, ``shutil.which(...)`` and ``need_binary(...)``, and the command words of
the Makefile's recipes and of scripts/*.sh. Each must come either from the virtualenv (a console
script of a distribution that pyproject.toml requires) or from a Debian package that
scripts/apt-packages.txt lists, that a listed package depends on, or that every Debian system has
(Essential or Priority: required). dpkg -S maps a program to its package.

What it cannot see: programs inside shell script text (a ``bash -c`` body, a kickstart), and
programs that run on the machines being provisioned (roles, plugins, templates), which are not
the host's to install.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

from tests.support import need

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
APT_LIST = REPO / "scripts" / "apt-packages.txt"
PYTHON_SOURCES = ("tests", "bench", "labctl", "bastion_app", "labcore")
SHELL_SOURCES = ("Makefile", "scripts/*.sh")
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}
#: helpers that take a command list (tests/support.run, makeiso._run, discovery._run, image._run)
RUN_HELPERS = {"run", "_run"}
DEBIAN_BIN = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")
SYSTEM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
#: shell words that are not programs (keywords and builtins)
SHELL_WORDS = {"if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case", "esac",
               "function", "exit", "set", "export", "local", "trap", "mapfile", "printf", "echo", "read", "cd",
               "test", "true", "false", "return", "shift", "break", "continue", "source", ".", "[", "[[", "!",
               "exec", "command", "eval", "wait", "unset", "declare"}
_PROGRAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


# -- what the project calls ---------------------------------------------------------------------------
def _first(node: ast.AST) -> str | None:
    """The program of a command-list literal: its first element, a string or ``str(BIN / "name")``."""
    if not isinstance(node, ast.List | ast.Tuple) or not node.elts:
        return None
    e = node.elts[0]
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "str" and e.args:
        e = e.args[0]
    if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Div) and isinstance(e.right, ast.Constant):
        if isinstance(e.right.value, str) and e.right.value.startswith("bin/"):
            return None  # venv / "bin/pip": a program of a virtualenv the test made itself
        e = e.right  # BIN / "ansible-playbook": a console script of the virtualenv
    if isinstance(e, ast.Constant) and isinstance(e.value, str):
        return e.value
    return None


def _word(text: str) -> str | None:
    m = _PROGRAM.match(text.strip())
    return m.group(0) if m else None


def python_calls(path: Path) -> dict[str, list[str]]:
    tree = ast.parse(path.read_text(), str(path))
    lists: dict[str, list[ast.AST]] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Name):
                    lists.setdefault(t.id, []).append(n.value)
    out: dict[str, list[str]] = {}
    where = str(path.relative_to(REPO))
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        found: list[str | None] = []
        if n.args and ((owner == "subprocess" and name in SUBPROCESS) or (owner is None and name in RUN_HELPERS)):
            arg = n.args[0]
            found += [_first(v) for v in (lists.get(arg.id, []) if isinstance(arg, ast.Name) else [arg])]
        elif name == "sh" and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str):
            found.append(_word(n.args[0].value))
        elif name in ("which", "need_binary"):
            found += [a.value for a in n.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        for prog in found:
            if prog and _PROGRAM.fullmatch(Path(prog).name):
                out.setdefault(Path(prog).name, []).append(f"{where}:{n.lineno}")
    return out


def shell_calls(path: Path, make_vars: dict[str, str]) -> dict[str, list[str]]:
    """Command words of a shell script or of a Makefile's recipes (lines that begin with a tab)."""
    out: dict[str, list[str]] = {}
    where = str(path.relative_to(REPO))
    makefile = path.name == "Makefile"
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if makefile:
            if not line.startswith("\t"):  # outside recipes only $(shell ...) runs a program
                line = " ; ".join(re.findall(r"\$\(shell ([^)]*)\)", line))
            line = re.sub(r"\$\((\w+)\)", lambda m: make_vars.get(m.group(1), "$" + m.group(1)), line.lstrip("\t@-"))
        if line.lstrip().startswith("#"):
            continue
        # quoted text is arguments, except a command substitution inside double quotes
        line = re.sub(r"'[^']*'", "''", line)
        line = re.sub(r'"[^"]*"', lambda m: m.group(0) if "$(" in m.group(0) else '""', line)
        for segment in re.split(r"\|\||&&|[;|(`]|\$\(|<\(", line):
            words = segment.split()
            while words and (words[0] in SHELL_WORDS or "=" in words[0] or words[0].startswith("-")):
                if words[0] in ("for", "case", "export", "local", "echo", "printf", "set", "trap", "exit", "read",
                                "mapfile", "cd", "return", "test", "[", "[[", "declare", "unset"):
                    words = []  # the rest are arguments, not programs
                    break
                words = words[1:]
            if words and _PROGRAM.fullmatch(words[0]) and not words[0].startswith("$"):
                out.setdefault(words[0], []).append(f"{where}:{lineno}")
    return out


def make_variables() -> dict[str, str]:
    """The Makefile's `NAME ?= value` / `NAME := value`, one level expanded; the virtualenv's
    programs ($(VENV)/bin/...) are named as venv:<program>."""
    raw = dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.*)$", (REPO / "Makefile").read_text(), re.M))
    out = {}
    for k, v in raw.items():
        v = re.sub(r"\$\((\w+)\)", lambda m: raw.get(m.group(1), ""), v).strip()
        out[k] = ("venv-" + Path(v).name) if "/bin/" in v else v
    return out


def called_programs() -> dict[str, list[str]]:
    calls: dict[str, list[str]] = {}
    for top in PYTHON_SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            for prog, where in python_calls(path).items():
                calls.setdefault(prog, []).extend(where)
    make_vars = make_variables()
    for pattern in SHELL_SOURCES:
        for path in sorted(REPO.glob(pattern)):
            for prog, where in shell_calls(path, make_vars).items():
                calls.setdefault(prog, []).extend(where)
    return calls


# -- what the project installs ----------------------------------------------------------------------
def listed_packages() -> list[str]:
    return [ln.split()[0] for ln in APT_LIST.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


@cache
def venv_programs() -> dict[str, str]:
    """Console scripts of the distributions pyproject.toml requires (closure over their requirements)
    -> the distribution."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [_requirement_name(r) for r in project["dependencies"]]
    todo += [_requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra]
    seen: set[str] = set()
    out: dict[str, str] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for ep in dist.entry_points:
            if ep.group == "console_scripts":
                out[ep.name] = name
        for f in dist.files or []:  # scripts= programs (pykickstart's ksvalidator) have no entry point
            if "bin" in f.parts[:-1]:
                out.setdefault(f.name, name)
        todo += [_requirement_name(r) for r in dist.requires or [] if "extra ==" not in r]
    for ep in metadata.distribution("lab-platform").entry_points if _installed("lab-platform") else []:
        out[ep.name] = "lab-platform"
    return out


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


@cache
def dpkg_status() -> dict[str, dict[str, str]]:
    """Every installed Debian package: its Essential and Priority fields and its dependencies."""
    fmt = "${Package}\t${Status}\t${Essential}\t${Priority}\t${Depends}, ${Pre-Depends}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt], capture_output=True, text=True, check=True).stdout
    rows = (line.split("\t") for line in out.splitlines())
    return {r[0]: {"essential": r[2], "priority": r[3], "depends": r[4]} for r in rows if r[1] == "install ok installed"}


@cache
def provided_packages() -> dict[str, str]:
    """Debian package -> why it is there: listed, a dependency of a listed one, or on every system."""
    installed = dpkg_status()
    why = {p: f"Debian {'Essential' if i['essential'] == 'yes' else 'Priority: required'}"
           for p, i in installed.items() if i["essential"] == "yes" or i["priority"] == "required"}
    todo = [(p, "listed in scripts/apt-packages.txt") for p in listed_packages()]
    while todo:
        pkg, reason = todo.pop()
        if pkg not in installed or (pkg in why and not why[pkg].startswith("Debian")):
            continue
        why[pkg] = reason
        for alternatives in installed[pkg]["depends"].split(","):
            names = [a.strip().split(" ")[0].split(":")[0] for a in alternatives.split("|")]
            todo += [(n, f"a dependency of {pkg}") for n in names[:1] + [n for n in names[1:] if n in installed]]
    return why


@cache
def package_of(path: str) -> list[str]:
    """The Debian package(s) that own ``path`` (also under its merged-/usr twin)."""
    names = {path, os.path.realpath(path)}
    for p in list(names):
        for a, b in (("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/")):
            names |= {p.replace(a, b, 1), p.replace(b, a, 1)}
    r = subprocess.run(["dpkg", "-S", *sorted(names)], capture_output=True, text=True)
    return sorted({owner.strip().split(":")[0] for line in r.stdout.splitlines() if ": " in line
                   for owner in line.rsplit(": ", 1)[0].split(",")})


# -- the checks ---------------------------------------------------------------------------------------
def test_the_scan_finds_what_is_known_to_be_called():
    """The scanner sees each kind of call (so an empty result cannot pass for 'nothing missing')."""
    calls = called_programs()
    expected = {"cpio": "tests/integration/test_discovery_image.py", "nginx": "bench/artefacts.py",
                "ip": "labcore/bastion_config.py", "xorriso": "labctl/makeiso.py",
                "ansible-playbook": "tests/ansible/", "sha1sum": "Makefile", "dpkg-query": "scripts/install-system-deps.sh",
                "apt-get": "scripts/install-system-deps.sh", "qemu-system-x86_64": "tests/"}
    for prog, where in expected.items():
        assert any(w.startswith(where) for w in calls.get(prog, [])), (prog, calls.get(prog))
    assert "venv-python" in calls and not {"echo", "if", "for", "$PY", "python"} & set(calls)


def test_every_called_program_is_installed_by_the_project():
    need(shutil.which("dpkg") is not None and shutil.which("dpkg-query") is not None,
         "needs dpkg (a Debian host) to map programs to packages")
    provided, venv = provided_packages(), venv_programs()
    problems = []
    for prog, where in sorted(called_programs().items()):
        at = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        name = prog.removeprefix("venv-")
        if prog.startswith("venv-") or (VENV_BIN / name).exists() and name in venv:
            if name not in venv and name not in ("python", "python3", "pip"):
                problems.append(f"`{name}` (called by {at}) is run from the virtualenv, but no distribution that "
                                "pyproject.toml requires installs it: add that distribution to pyproject.toml")
            continue
        # a program found first elsewhere (pyenv's python3 shim) is checked at its Debian place
        path = next((p for p in [shutil.which(prog, path=SYSTEM_PATH)] + [f"{d}/{prog}" for d in DEBIAN_BIN]
                     if p and os.path.exists(p) and package_of(p)), None) or shutil.which(prog, path=SYSTEM_PATH)
        if path is None:
            problems.append(f"`{prog}` (called by {at}) is not installed on this host: add the Debian package that "
                            f"provides it to scripts/apt-packages.txt (apt-file search --regexp 'bin/{prog}$')")
            continue
        owners = package_of(path)
        if not owners:
            problems.append(f"`{prog}` (called by {at}) is {path}, which no Debian package owns: install it "
                            "from a package listed in scripts/apt-packages.txt or from pyproject.toml")
        elif not any(o in provided for o in owners):
            problems.append(f"`{prog}` (called by {at}) comes from the Debian package {' or '.join(owners)}, which "
                            f"scripts/apt-packages.txt does not install: add `{owners[0]}` to it")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line", ["\tcurl -fsS x | zstd -d > y && $(PY) -m pytest",
                                  "\t@for b in bench/*.py; do echo \"== $$b\"; $(PY) $$b || exit 1; done"])
def test_shell_command_words(tmp_path, line, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    mk = tmp_path / "Makefile"
    mk.write_text("PY := .venv/bin/python\nall:\n" + line + "\n")
    found = set(shell_calls(mk, {"PY": "venv-python"}))
    assert found == ({"curl", "zstd", "venv-python"} if "curl" in line else {"venv-python"})
