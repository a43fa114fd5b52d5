"""The collection as AWX, Galaxy and CI see it: `ansible-galaxy collection build` and `install`,
ansible-doc of every plugin from the installed copy, `ansible-test sanity` and ansible-lint
(production profile)."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.support import BIN, REPO, ansible_env, run

PLUGINS = [("inventory", "lab.platform.lab"), ("module", "lab.platform.lab_machine"),
           ("module", "lab.platform.lab_machine_info"), ("module", "lab.platform.efi_bootnext"),
           ("module", "lab.platform.lab_power")]


def build(tmp_path: Path) -> Path:
    """`ansible-galaxy collection build` of this checkout; the tarball."""
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    r = run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path / "dist"), str(REPO)],
            ansible_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp_path / "dist" / f"lab-platform-{version}.tar.gz"


def test_build_and_install(tmp_path):
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    env = ansible_env(tmp_path)
    tarball = build(tmp_path)
    with tarfile.open(tarball) as tf:
        names = set(tf.getnames())
    assert {"plugins/inventory/lab.py", "plugins/module_utils/lab_client.py", "meta/runtime.yml",
            "roles/bastion/meta/argument_specs.yml", "playbooks/bastion.yml"} <= names
    assert not any(n.startswith(("tests/", "labcore/", "bastion_app/", ".venv/", "bench/")) for n in names)
    dest = tmp_path / "installed"
    r = run([str(BIN / "ansible-galaxy"), "collection", "install", "--no-deps", "-p", str(dest), str(tarball)], env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([str(BIN / "ansible-galaxy"), "collection", "list", "lab.platform", "--format", "json", "-p", str(dest)],
            ansible_env(dest))
    assert r.returncode == 0, r.stderr
    listed = {c: v for path in json.loads(r.stdout).values() for c, v in path.items()}
    assert listed["lab.platform"]["version"] == version
    for kind, name in PLUGINS:
        r = run([str(BIN / "ansible-doc"), "-t", kind, "--json", name], ansible_env(dest))
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)[name]
        assert doc["doc"]["description"] and doc["examples"], name
        if kind == "module":
            assert doc["return"], name


@pytest.mark.slow
def test_ansible_test_sanity(tmp_path):
    """ansible-test sanity, local, on the plugins (the collection tree ansible-test needs is copied)."""
    root = tmp_path / "ansible_collections" / "lab" / "platform"
    root.mkdir(parents=True)
    for name in ("plugins", "meta"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "galaxy.yml", root / "galaxy.yml")
    shutil.copytree(REPO / "tests" / "sanity", root / "tests" / "sanity")
    # ansible-test downloads its pip bootstrap from ci-files.testing.ansible.com (not reachable here);
    # give it an equivalent that uses ensurepip and the package index (see get_pip_offline.py).
    cache = Path.home() / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    import ansible_test  # noqa: PLC0415

    source = (Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py").read_text()
    versions = set(re.findall(r"pip='([0-9.]+)'", source))
    assert versions, "ansible-test no longer names its pip version where this test looks"
    for pip_version in versions:
        target = cache / f"get_pip_{pip_version.replace('.', '_')}.py"
        if not target.exists():
            shutil.copy(REPO / "tests" / "ansible" / "get_pip_offline.py", target)
    env = {**ansible_env(tmp_path), "HOME": str(Path.home())}
    r = run([str(BIN / "ansible-test"), "sanity", "--local", "--python", "3.11", "--color", "no"], env, cwd=root, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]


def test_ansible_lint_production(tmp_path):
    """The whole collection as Galaxy's importer lints it (galaxy_importer/loaders/collection.py): the
    built tarball extracted to ansible_collections/lab/platform, `ansible-lint --profile production`
    run there without paths (it reads the shipped .ansible-lint). The importer logs ansible-lint's
    ERROR and CRITICAL lines too, so there must be none. It sets ANSIBLE_COLLECTIONS_PATH to the
    ansible_collections directory itself; ansible-lint 26 resolves `import_playbook: lab.platform.x`
    by appending ansible_collections/... to each path, so the test gives the parent directory, as
    Ansible documents the setting (both find the collection)."""
    root = tmp_path / "import" / "ansible_collections" / "lab" / "platform"
    root.mkdir(parents=True)
    with tarfile.open(build(tmp_path)) as tf:
        tf.extractall(root, filter="data")
    assert (root / ".ansible-lint").exists() and (root / "MANIFEST.json").exists()
    env = ansible_env(tmp_path / "import", ANSIBLE_HOME=str(tmp_path / "home"))
    r = run([str(BIN / "ansible-lint"), "--profile", "production", "--exclude", "tests/integration/", "--exclude",
             "tests/unit/", "--offline", "--nocolor"], env, cwd=root, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert not r.stdout.strip(), r.stdout[-6000:]
    logged = [line for line in r.stderr.splitlines() if line.startswith(("CRITICAL", "ERROR"))]
    assert not logged, "\n".join(logged)
    assert "Profile 'production' was required, and it passed." in r.stderr, r.stderr[-3000:]
