"""The domain's tables (labcore.domain) against everything that cannot import them: the Ansible
modules' choices, the playbooks' and roles' lists of lab roles, the inventory plugin and the example
inventory; and against the disk layout (labcore.layout) and the API view of a machine."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from labcore import domain, layout, schemas
from labcore.lifecycle import STORED_STATES

REPO = Path(__file__).resolve().parents[2]
STATES = [s.value for s in STORED_STATES]
#: option name (in a module's argument spec and DOCUMENTATION) -> the names it must offer, in order
CHOICES = {
    "role": list(domain.ROLE_NAMES),
    "os": list(domain.OS_NAMES),
    "debug_mode": list(domain.DEBUG_MODES),
    "machine_state": STATES,
}
MODULES = ["plugins/modules/lab_machine.py", "plugins/modules/lab_machine_info.py"]


def _doc_block(path: Path, name: str) -> str:
    """The string assigned to ``name`` (DOCUMENTATION, EXAMPLES) at the top of a plugin file."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no {name}")


def _spec_choices(path: Path) -> dict[str, list]:
    """option -> choices of every ``option=dict(..., choices=[...])`` in the module's code."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.keyword) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "dict"):
            for kw in node.value.keywords:
                if kw.arg == "choices":
                    out[node.arg] = ast.literal_eval(kw.value)
    return out


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, i))


def _ansible_yaml() -> list[Path]:
    """Every playbook, role default and argument spec, and the example inventory."""
    return sorted([*REPO.glob("playbooks/*.yml"), *REPO.glob("roles/*/defaults/*.yml"),
                   *REPO.glob("roles/*/meta/argument_specs.yml"), *REPO.glob("inventory/**/*.yml")])


@pytest.mark.parametrize("module", MODULES)
def test_module_choices_are_the_tables(module):
    path = REPO / module
    options = yaml.safe_load(_doc_block(path, "DOCUMENTATION"))["options"]
    spec = _spec_choices(path)
    checked = [name for name in CHOICES if name in options or name in spec]
    assert {"role", "os"} <= set(checked), f"{module}: no role/os options found (did the module change shape?)"
    for name in checked:
        assert options[name]["choices"] == CHOICES[name], f"{module} DOCUMENTATION {name} choices"
        assert spec[name] == CHOICES[name], f"{module} argument spec {name} choices"


def test_inventory_plugin_states_and_examples_are_the_tables():
    path = REPO / "plugins/inventory/lab.py"
    assert yaml.safe_load(_doc_block(path, "DOCUMENTATION"))["options"]["states"]["choices"] == STATES
    # the examples' expressions name only roles and operating systems that exist
    for doc in yaml.safe_load_all(_doc_block(path, "EXAMPLES")):
        for _, value in _walk(doc):
            if isinstance(value, str):
                _check_expression(value, f"{path.name} EXAMPLES")


_COMPARED = re.compile(r"\blab_(role|os)\s*(?:==|!=)\s*['\"]([^'\"]*)['\"]")
_LISTED = re.compile(r"\blab_(role|os)\s*(?:\|\s*default\([^)]*\)\s*)?(?:not\s+)?in\s*\[([^\]]*)\]")


def _check_expression(text: str, where: str) -> None:
    known = {"role": domain.ROLE_NAMES, "os": domain.OS_NAMES}
    for kind, name in _COMPARED.findall(text):
        assert name in known[kind], f"{where}: {text!r} names an unknown {kind} {name!r}"
    for kind, items in _LISTED.findall(text):
        for name in re.findall(r"['\"]([^'\"]*)['\"]", items):
            assert name in known[kind], f"{where}: {text!r} names an unknown {kind} {name!r}"


def test_playbooks_and_roles_list_the_k3s_roles_of_the_table():
    expected = {"server": list(domain.K3S_SERVER_ROLES), "agent": list(domain.K3S_AGENT_ROLES)}
    found = []
    for path in _ansible_yaml():
        where = str(path.relative_to(REPO))
        for doc in yaml.safe_load_all(path.read_text()):
            for keys, value in _walk(doc):
                if isinstance(value, str):
                    _check_expression(value, where)
                names = [k for k in keys if isinstance(k, str)]
                # `k3s_server_lab_roles: [...]` (playbook vars, defaults) or its argument spec default
                key = names[-1] if names and names[-1].endswith("_lab_roles") else (
                    names[-2] if names[-2:-1] and names[-2].endswith("_lab_roles") and names[-1] == "default" else None)
                if key and isinstance(value, list):
                    kind = "server" if "server" in key else "agent"
                    assert value == expected[kind], f"{where}: {key} is {value}, the role table says {expected[kind]}"
                    found.append((where, key))
    assert ("playbooks/k3s.yml", "k3s_server_lab_roles") in found and ("playbooks/k3s.yml", "k3s_agent_lab_roles") in found


def test_inventory_group_vars_name_known_operating_systems():
    groups = {"lab_os_" + re.sub(r"[^A-Za-z0-9_]", "_", o) for o in domain.OS_NAMES}
    files = {p.stem for p in (REPO / "inventory/group_vars").glob("lab_os_*.yml")}
    assert files and files <= groups, f"group_vars for unknown operating systems: {sorted(files - groups)}"


def test_images_manifest_has_an_entry_for_every_operating_system():
    """What `lab-bastion images sync` fetches (its built-in manifest) covers the OS table's
    installer-media systems exactly; the image-deployed ones are built (images build-os)."""
    from bastion_app.images.osimage import image_os
    from bastion_app.images.sync import DEFAULT_MANIFEST

    assert set(DEFAULT_MANIFEST) == set(domain.MEDIA_OS_NAMES)
    assert domain.IMAGE_OS_NAMES and all(image_os(name).suite for name in domain.IMAGE_OS_NAMES)
    assert set(domain.MEDIA_OS_NAMES) | set(domain.IMAGE_OS_NAMES) == set(domain.OS_NAMES)


def test_state_import_takes_the_debug_modes_of_the_table():
    import pydantic

    from bastion_app.stateio import validate_state_doc

    mac = "52:54:00:00:00:09"
    for mode in domain.DEBUG_MODES:
        assert validate_state_doc({"debug": {mac: {"mode": mode}}})["debug"][mac]["mode"] == mode
    with pytest.raises(pydantic.ValidationError):
        validate_state_doc({"debug": {mac: {"mode": "shell"}}})


def test_role_table_names_and_lookups():
    assert len(set(domain.ROLE_NAMES)) == len(domain.ROLES) and len(set(domain.OS_NAMES)) == len(domain.OPERATING_SYSTEMS)
    assert set(domain.K3S_ROLES) == set(domain.K3S_SERVER_ROLES) | set(domain.K3S_AGENT_ROLES)
    assert domain.role("worker").k3s == "agent" and domain.operating_system("ubuntu-26.04").installer == "autoinstall"
    assert domain.RESCUE_OS.installer == "kickstart"  # the rescue and discovery environments are kickstarts


def test_layout_keeps_what_the_role_table_says():
    """Each role's kept volumes are its data volumes, and a reprovision keeps exactly those plus
    /home and /srv; every data volume belongs to some role."""
    for role in domain.ROLES:
        volumes = layout.volumes_for(role.name)
        assert len({v.name for v in volumes}) == len(volumes)
        assert {v.mount for v in volumes if v.preserve} == {"/home", "/srv", *role.kept_volumes}, role.name
    used = {m for r in domain.ROLES for m in r.kept_volumes}
    assert used == set(layout.DATA_VOLUMES), "a data volume in labcore.layout that no role keeps, or the reverse"
    assert all(v.preserve for v in layout.DATA_VOLUMES.values())


def test_machine_view_has_the_fields_of_its_schema_in_order_and_no_token(client, auth):
    mac = "52:54:00:12:34:56"
    assert client.post("/api/discover", json={"mac": mac}).status_code == 200
    assert client.post("/api/debug", json={"mac": mac, "mode": "pxe"}, headers=auth).status_code == 202
    detail = client.get(f"/api/machines/{mac}", headers=auth).json
    assert list(detail) == [*schemas.MachineView.model_fields, "events"]
    (listed,) = client.get("/api/machines", headers=auth).json["machines"]
    assert list(listed) == list(schemas.MachineView.model_fields) and "install_token" not in listed
    assert listed["debug"] == "pxe" and listed["stalled"] is False and listed["installed_at"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", listed["created_at"])


def test_layout_sizes_are_the_seeds_gb_and_fit_a_240_gb_disk():
    from labcore import layout

    # the seed's table is in GB: 27 GB of swap is 25750 MiB (not 27 GiB = 27648 MiB)
    assert layout.COMMON[0].size_mib == 25750 and layout.EFI_MIB == 573 and layout.BOOT_MIB == 2862
    disk_240gb_mib = 240 * 10**9 // 2**20
    for role in ("vanilla", "worker", "infra", "labcontroller"):
        assert layout.disk_mib_needed(role) < disk_240gb_mib, role
    # infra: fixed volumes 220 GB + ESP + /boot + BIOS boot, GPT and LVM metadata, each volume in 4 MiB extents
    assert layout.disk_mib_needed("infra") == 2 + 1 + 573 + 2862 + 1 + sum(
        -(-v.size_mib // 4) * 4 for v in layout.volumes_for("infra"))
    assert layout.lv_alloc_mib(layout.DATA_VOLUMES["/var/lib/longhorn"]) == 4  # the rest: at least one extent
