"""The k3s roles' documentation and specs cannot drift (fast; no VM)."""

from __future__ import annotations

import pytest
import yaml

from tests.roles.role_docs import K3S_ROLES, ROLES, load_defaults, load_specs, render_readme


@pytest.mark.parametrize("role", K3S_ROLES)
def test_argument_specs_match_defaults(role):
    options = set(load_specs(role)["main"]["options"])
    defaults = set(load_defaults(role))
    assert options == defaults, (
        f"roles/{role}: only in argument_specs: {sorted(options - defaults)}; only in defaults: {sorted(defaults - options)}"
    )


@pytest.mark.parametrize("role", K3S_ROLES)
def test_public_variables_use_the_role_prefix(role):
    prefix = f"{role}_" if not role.startswith("_") else f"{role}_"
    bad = [name for name in load_defaults(role) if not name.startswith(prefix)]
    assert not bad, f"roles/{role}/defaults: variables without the {prefix} prefix: {bad}"


@pytest.mark.parametrize("role", K3S_ROLES)
def test_readme_is_generated_from_argument_specs(role):
    readme = ROLES / role / "README.md"
    assert readme.exists() and readme.read_text() == render_readme(role), (
        f"{readme} is stale: run `python -m tests.roles.role_docs readme`"
    )


@pytest.mark.parametrize("role", K3S_ROLES)
def test_spec_defaults_are_the_defaults(role):
    defaults = load_defaults(role)
    for name, option in load_specs(role)["main"]["options"].items():
        if "default" in option:
            assert option["default"] == defaults[name], f"roles/{role}: {name} default differs from defaults/main.yml"


def test_os_family_vars_exist_for_both_families():
    for role in ("k3s_host_prep", "k3s_agent"):
        for family in ("Debian", "RedHat"):
            data = yaml.safe_load((ROLES / role / "vars" / f"{family}.yml").read_text())
            assert data, f"roles/{role}/vars/{family}.yml is empty"
