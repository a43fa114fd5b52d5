"""Role documentation kept in one place: meta/argument_specs.yml. The one README generator of every role.

    python -m tests.roles.role_docs readme [--check] [ROLE...]   write (or check) roles/<role>/README.md
    python -m tests.roles.role_docs spec ROLE                    draft argument_specs from defaults/main.yml

`readme` renders the README of each role under roles/ that has meta/argument_specs.yml (all of them
without ROLE arguments) from its argument_specs, the role's meta/main.yml (description, dependencies,
platforms) and its optional README.intro.md (hand-written text placed before the variables), so the
README cannot drift from what Ansible validates; tests/roles/test_role_docs.py fails when a README is
stale or when argument_specs and defaults/main.yml list different variables or defaults.
`spec` is a one-off helper for a new role: it drafts the spec from the defaults file, taking each
variable's description from the comment block right above it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"


def all_roles() -> list[str]:
    """Every role under roles/ with meta/argument_specs.yml."""
    return sorted(p.parent.parent.name for p in ROLES.glob("*/meta/argument_specs.yml"))


def load_specs(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "meta/argument_specs.yml").read_text())["argument_specs"]


def load_defaults(role: str) -> dict:
    path = ROLES / role / "defaults/main.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def _markup(text: str) -> str:
    """Ansible doc markup to Markdown: C(x), O(x), V(x), E(x) -> `x`; I(x) -> *x*."""
    text = re.sub(r"\b[COVE]\(([^()]*(?:\([^()]*\)[^()]*)*)\)", r"`\1`", text)
    return re.sub(r"\bI\(([^()]*)\)", r"*\1*", text)


def _text(value) -> str:
    if isinstance(value, list):
        return _markup(" ".join(str(v) for v in value))
    return _markup(str(value or ""))


def _default_cell(option: dict, name: str, defaults: dict) -> str:
    value = option["default"] if "default" in option else defaults.get(name, None)
    if value is None and name not in defaults:
        return "(required)" if option.get("required") else ""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if dumped.endswith("\n..."):
        dumped = dumped[: -len("\n...")]
    dumped = dumped.removesuffix("...").strip()
    return f"`{dumped}`".replace("|", "\\|")


def _lead(short: str, description: str) -> str:
    """The spec's short description, unless the meta description already starts with it, then the latter."""
    short, description = short.strip().rstrip("."), description.strip().rstrip(".")
    if not short or description.lower().startswith(short.lower()):
        return f"{description}."
    return f"{short}. {description}." if description else f"{short}."


def _platforms(meta: dict) -> str:
    names = []
    for platform in meta.get("galaxy_info", {}).get("platforms", []):
        versions = [str(v) for v in platform.get("versions", [])]
        shown = "all versions" if versions == ["all"] else ", ".join(versions)
        names.append(f"{platform['name']} ({shown})" if shown else platform["name"])
    return "Hosts with systemd: " + "; ".join(names) + "."


def render_readme(role: str) -> str:
    specs = load_specs(role)
    defaults = load_defaults(role)
    meta = yaml.safe_load((ROLES / role / "meta/main.yml").read_text())
    intro_path = ROLES / role / "README.intro.md"
    intro = intro_path.read_text().strip() if intro_path.exists() else ""
    lines = [
        f"# lab.platform.{role}",
        "",
        "<!-- Generated from meta/argument_specs.yml by `python -m tests.roles.role_docs readme`; do not edit. -->",
        "",
        _lead(_text(specs.get("main", {}).get("short_description")), _text(meta.get("galaxy_info", {}).get("description"))),
        "",
    ]
    for entry, spec in specs.items():
        if entry != "main":  # an entry point of include_role's tasks_from: its heading, then its text
            lines += [f"## Entry point `{entry}`", ""]
            if spec.get("short_description"):
                lines += [_lead(_text(spec["short_description"]), ""), ""]
        if spec.get("description"):
            lines += [f"- {_text(d)}" for d in spec["description"]]
            lines.append("")
        if entry == "main":
            if intro:
                lines += [intro, ""]
            lines += ["## Variables", ""]
        lines += ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
        for name, option in spec.get("options", {}).items():
            kind = option.get("type", "str")
            if kind == "list" and option.get("elements"):
                kind = f"list of {option['elements']}"
            desc = _text(option.get("description")).replace("\n", " ").replace("|", "\\|")
            if option.get("choices"):
                desc += " One of: " + ", ".join(f"`{c}`" for c in option["choices"]) + "."
            lines.append(f"| `{name}` | {kind} | {_default_cell(option, name, defaults)} | {desc} |")
        lines.append("")
    deps = [d["role"] if isinstance(d, dict) else d for d in meta.get("dependencies", [])]
    if deps:
        lines += ["## Dependencies", "", *[f"- `{d}`" for d in deps], ""]
    lines += ["## Platforms", "", _platforms(meta), ""]
    return "\n".join(lines)


def _comment_blocks(path: Path) -> dict[str, str]:
    """Top-level key -> the comment block right above it."""
    out, block = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            block.append(line.lstrip("#").strip())
        elif line and not line.startswith((" ", "-")) and ":" in line:
            key = line.split(":", 1)[0].strip()
            if block:
                out[key] = " ".join(block)
            block = []
        elif not line.strip():
            pass
    return out


def draft_spec(role: str) -> str:
    defaults = load_defaults(role)
    comments = _comment_blocks(ROLES / role / "defaults/main.yml")
    options = {}
    last = ""
    for name, value in defaults.items():
        desc = comments.get(name) or last
        last = desc
        opt: dict = {"description": desc or name}
        templated = isinstance(value, str) and "{{" in value
        if isinstance(value, bool):
            opt["type"] = "bool"
        elif isinstance(value, int):
            opt["type"] = "int"
        elif isinstance(value, list):
            opt["type"] = "list"
            opt["elements"] = "dict" if value and all(isinstance(v, dict) for v in value) else "str"
        elif isinstance(value, dict):
            opt["type"] = "dict"
        else:
            opt["type"] = "str"
        if templated:
            opt["description"] = f"{opt['description']} Default: C({value.strip()})."
        else:
            opt["default"] = value
        options[name] = {k: opt[k] for k in ("type", "elements", "default", "description") if k in opt}
    spec = {"argument_specs": {"main": {"short_description": role, "options": options}}}
    return "---\n" + yaml.safe_dump(spec, sort_keys=False, width=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.roles.role_docs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_readme = sub.add_parser("readme")
    p_readme.add_argument("--check", action="store_true")
    p_readme.add_argument("roles", nargs="*")
    p_spec = sub.add_parser("spec")
    p_spec.add_argument("role")
    args = parser.parse_args(argv)
    if args.cmd == "spec":
        print(draft_spec(args.role), end="")
        return 0
    stale = []
    for role in args.roles or all_roles():
        path = ROLES / role / "README.md"
        text = render_readme(role)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print("stale READMEs (run python -m tests.roles.role_docs readme): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
