"""Role READMEs generated from meta/argument_specs.yml (so they cannot drift from it).

    python -m tests.ansible.role_docs roles/bastion roles/dnsmasq     # rewrite the READMEs
test_role_docs.py checks that every README is current and that argument_specs and defaults/main.yml
list the same variables with the same defaults.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

HEADER = "<!-- Generated from meta/argument_specs.yml by `python -m tests.ansible.role_docs`; do not edit. -->\n"


def _text(value) -> str:
    """Description text with Ansible's C(), O(), V(), E() markup as Markdown code."""
    items = value if isinstance(value, list) else [value]
    return re.sub(r"\b[COVE]\(([^()]*)\)", r"`\1`", " ".join(str(i).strip() for i in items))


def render(role: Path) -> str:
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]
    intro = (role / "README.intro.md").read_text().strip() + "\n\n" if (role / "README.intro.md").exists() else ""
    lines = [HEADER, f"# lab.platform.{role.name}\n", f"{spec['short_description']}.\n", "\n".join(f"- {_text(d)}" for d in spec.get("description", [])) + "\n",
             intro + "## Variables\n", "| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for name, opt in spec.get("options", {}).items():
        default = opt.get("default", "")
        shown = "`" + yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip() + "`" if "default" in opt else "(required)"
        typ = opt.get("type", "str") + (f" of {opt['elements']}" if opt.get("elements") else "")
        desc = _text(opt.get("description", "")).replace("|", "\\|")
        if opt.get("choices"):
            desc += " One of: " + ", ".join(f"`{c}`" for c in opt["choices"]) + "."
        lines.append(f"| `{name}` | {typ} | {shown} | {desc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    for path in argv:
        role = Path(path)
        (role / "README.md").write_text(render(role))
        print(f"wrote {role / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
