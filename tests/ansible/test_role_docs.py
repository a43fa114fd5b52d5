"""Each role's meta/argument_specs.yml, defaults/main.yml and README.md agree."""

from __future__ import annotations

import pytest
import yaml

from tests.ansible.conftest import REPO
from tests.ansible.role_docs import render

ROLES = ["bastion", "dnsmasq"]


@pytest.mark.parametrize("name", ROLES)
def test_argument_specs_match_defaults(name):
    role = REPO / "roles" / name
    options = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text())
    assert set(options) == set(defaults)
    for key, value in defaults.items():
        assert options[key].get("default") == value, key
        assert options[key].get("description"), key


@pytest.mark.parametrize("name", ROLES)
def test_readme_is_generated_from_argument_specs(name):
    role = REPO / "roles" / name
    assert (role / "README.md").read_text() == render(role), f"run: python -m tests.ansible.role_docs roles/{name}"
