"""What docs/awx.md and docs/semaphore.md tell a user to do, done here as far as it can be without
AWX or Semaphore themselves:

- the execution environment definition (contrib/ee/execution-environment.yml) is one that
  ansible-builder 3 accepts, pins the ansible-core and ansible-runner ranges pyproject.toml tests,
  and its build context installs the collection with no network (the galaxy stage's very command),
  with the collection's system needs found by ansible-builder's own introspection;
- collections/requirements.yml installs this checkout's collection offline, run as AWX's project
  sync and Semaphore run it (the checkout as the working directory), unedited;
- the AWX survey (contrib/awx/queue_install_survey.json) asks for what playbooks/awx_queue_install.yml
  reads, and its answers queue several installs on a real bastion, with the URL and token coming
  from the environment as the credential injects them.

What cannot run here: a container build (no container runtime), AWX's and Semaphore's own UIs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import requests
import yaml

from tests.support import BIN, REPO, ansible_env, ed25519_key, need, recap, run

EE = REPO / "contrib" / "ee" / "execution-environment.yml"
SURVEY = REPO / "contrib" / "awx" / "queue_install_survey.json"
QUEUE = REPO / "playbooks" / "awx_queue_install.yml"
#: Galaxy's address while installing: nothing listens there, so any attempt to use the network fails
OFFLINE = {"ANSIBLE_GALAXY_SERVER": "http://127.0.0.1:9/", "GIT_TERMINAL_PROMPT": "0"}


def pyproject_pin(dist: str) -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]
    (pin,) = {r.replace(" ", "") for r in reqs if re.match(rf"{re.escape(dist)}\s*[<>=!~]", r)}
    return pin


def built_collection(tmp_path: Path) -> set[str]:
    """The files of `ansible-galaxy collection build` of this checkout (what Galaxy would ship)."""
    r = run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path / "dist"), str(REPO)],
            ansible_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    (tarball,) = (tmp_path / "dist").glob("lab-platform-*.tar.gz")
    with tarfile.open(tarball) as tf:
        return {m.name for m in tf.getmembers() if m.isfile()} - {"MANIFEST.json", "FILES.json"}


def installed_files(root: Path) -> set[str]:
    coll = root / "ansible_collections" / "lab" / "platform"
    assert (coll / "MANIFEST.json").is_file(), f"lab.platform is not installed under {root}"
    return {str(p.relative_to(coll)) for p in coll.rglob("*") if p.is_file()} - {"MANIFEST.json", "FILES.json"}


# -- the execution environment -------------------------------------------------------------------
def test_ee_definition_pins_what_the_project_tests():
    ee = yaml.safe_load(EE.read_text())
    assert ee["version"] == 3
    deps = ee["dependencies"]
    assert deps["ansible_core"]["package_pip"] == pyproject_pin("ansible-core") == "ansible-core>=2.18,<2.20"
    assert deps["ansible_runner"]["package_pip"] == pyproject_pin("ansible-runner")
    assert (EE.parent / deps["galaxy"]).is_file()
    for entry in ee["additional_build_files"]:
        assert (EE.parent / entry["src"]).resolve().exists(), entry
    # the collection's own needs, which ansible-builder reads from the installed collection
    meta = yaml.safe_load((REPO / "meta" / "execution-environment.yml").read_text())
    assert {"python", "system"} <= set(meta["dependencies"])
    assert all((REPO / meta["dependencies"][k]).is_file() for k in ("python", "system"))


def test_ee_build_context_installs_the_collection_offline(tmp_path):
    builder = shutil.which("ansible-builder") or str(BIN / "ansible-builder")
    need(Path(builder).exists(), "needs ansible-builder (pip install -e '.[test]')")
    ctx = tmp_path / "context"
    r = subprocess.run([builder, "create", "-f", str(EE), "-c", str(ctx), "--output-filename", "Containerfile"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    containerfile = (ctx / "Containerfile").read_text()
    assert 'ANSIBLE_INSTALL_REFS="ansible-core>=2.18,<2.20 ansible-runner' in containerfile
    galaxy_step = next(ln for ln in containerfile.splitlines() if "ansible-galaxy collection install" in ln)
    assert "-r requirements.yml" in galaxy_step and "WORKDIR /build" in containerfile
    # the galaxy stage, as the Containerfile runs it: in the build context, with no network
    dest = tmp_path / "usr-share-ansible-collections"
    r = run([str(BIN / "ansible-galaxy"), "collection", "install", "-r", "requirements.yml", "--collections-path", str(dest)],
            {**ansible_env(tmp_path), **OFFLINE}, cwd=ctx / "_build")
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_files(dest) == built_collection(tmp_path / "built") & installed_files(dest)
    content = {f.split("/")[0] for f in installed_files(dest)}
    assert {"plugins", "roles", "playbooks", "meta"} <= content
    assert {f for f in built_collection(tmp_path / "built2") if f.split("/")[0] in ("plugins", "roles", "playbooks", "meta")} \
        <= installed_files(dest), "the EE lacks part of the collection: add it to additional_build_files"
    # the builder stage's introspection finds the collection's system packages
    r = run([sys.executable, str(ctx / "_build" / "scripts" / "introspect.py"), "introspect", str(dest)],
            ansible_env(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "openssh-client [platform:dpkg]" in r.stdout and "openssh-clients [platform:rpm]" in r.stdout


# -- collections/requirements.yml ------------------------------------------------------------------
def test_collections_requirements_install_the_checkout_offline(tmp_path):
    """AWX's project sync (and Semaphore before each run) runs `ansible-galaxy collection install -r
    collections/requirements.yml` in the project's checkout: it installs this very collection,
    as built, with no URL to edit and no network."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    checkout = tmp_path / "project"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (checkout / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, checkout / f)
    cache = tmp_path / "awx-cache" / "requirements_collections"
    r = run([str(BIN / "ansible-galaxy"), "collection", "install", "-r", "collections/requirements.yml",
             "--collections-path", str(cache), "--force"], {**ansible_env(tmp_path), **OFFLINE}, cwd=checkout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed_files(cache) == built_collection(tmp_path)
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    assert json.loads((cache / "ansible_collections/lab/platform/MANIFEST.json").read_text())["collection_info"]["version"] == version


# -- the AWX survey and the playbook it drives ---------------------------------------------------------
def _module_choices(option: str) -> list[str]:
    text = (REPO / "plugins" / "modules" / "lab_machine.py").read_text()
    doc = yaml.safe_load(re.search(r'DOCUMENTATION = r?"""(.*?)"""', text, re.S).group(1))
    return doc["options"][option]["choices"]


def test_survey_spec_is_what_awx_accepts_and_the_playbook_reads():
    survey = json.loads(SURVEY.read_text())
    assert {"name", "description", "spec"} <= set(survey)
    playbook = QUEUE.read_text()
    for q in survey["spec"]:
        assert {"type", "question_name", "question_description", "variable", "required"} <= set(q), q
        assert q["type"] in ("text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect")
        assert re.search(rf"\b{q['variable']}\b", playbook), f"the playbook does not read {q['variable']}"
        if q["type"] == "multiplechoice":
            assert q["default"] in q["choices"], q
    by_var = {q["variable"]: q for q in survey["spec"]}
    assert by_var["lab_installs_text"]["type"] == "textarea" and by_var["lab_installs_text"]["required"]
    assert by_var["lab_install_role"]["choices"] == _module_choices("role")
    assert by_var["lab_install_os"]["choices"] == _module_choices("os")
    assert not by_var["lab_bastion_url"]["required"]  # the credential's URL is the default


def _answers(**over) -> dict:
    """What AWX passes as extra vars: the survey's defaults, then the user's answers."""
    survey = json.loads(SURVEY.read_text())
    return {**{q["variable"]: q["default"] for q in survey["spec"]}, **over}


def queue_playbook(coll: Path, tmp_path: Path, env: dict, answers: dict):
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    r = run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(QUEUE), "-e", f"@{tmp_path / 'answers.json'}"],
            {**ansible_env(coll), **env})
    return r, recap(r.stdout).get("localhost", {})


@pytest.fixture(scope="module")
def discovered(lab_bastion):
    macs = [f"52:54:00:a0:00:0{i}" for i in range(1, 5)]
    for mac in macs:
        requests.post(lab_bastion.url + "/api/discover", json={"mac": mac, "hardware": {"firmware": "uefi"}},
                      timeout=10).raise_for_status()
    return macs


def _machine(b, mac):
    return requests.get(f"{b.url}/api/machines/{mac}", headers=b.headers, timeout=10).json()


def test_survey_answers_queue_several_installs(lab_bastion, discovered, coll, tmp_path):
    b, (m1, m2, m3, m4) = lab_bastion, discovered
    credential = {"LAB_BASTION_URL": b.url, "LAB_BASTION_TOKEN": b.token}  # as the credential type injects them
    key = ed25519_key(7)
    text = (f"# rack 1\n{m1} awx-n1 infra ubuntu-26.04\n\n  {m2.upper()}  awx-n2\n"
            f"{m3.replace(':', '-')} awx-n3 vanilla\n")
    answers = _answers(lab_installs_text=text, lab_install_role="worker", lab_install_os="fedora-43",
                       lab_install_ssh_keys=key + "\n")
    r, stats = queue_playbook(coll, tmp_path, credential, answers)
    assert r.returncode == 0, r.stdout + r.stderr
    assert stats["changed"] == 1 and stats["failed"] == 0  # one task, three items (checked below)
    got = {mac: _machine(b, mac) for mac in (m1, m2, m3)}
    assert [(m["state"], m["hostname"], m["role"], m["os"]) for m in got.values()] == [
        ("install_queued", "awx-n1", "infra", "ubuntu-26.04"), ("install_queued", "awx-n2", "worker", "fedora-43"),
        ("install_queued", "awx-n3", "vanilla", "fedora-43")]
    assert all(m["ssh_keys"] == [key] for m in got.values())
    assert _machine(b, m4)["state"] == "discovered"
    # the same survey again changes nothing
    r, stats = queue_playbook(coll, tmp_path, credential, answers)
    assert r.returncode == 0 and stats["changed"] == 0, r.stdout + r.stderr
    # JSON extra vars (Semaphore's way) with the list form, beside the text
    r, stats = queue_playbook(coll, tmp_path, credential, _answers(
        lab_installs_text="", lab_installs=[{"mac": m4, "hostname": "awx-n4", "role": "worker", "os": "fedora-43"}]))
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout + r.stderr
    assert _machine(b, m4)["hostname"] == "awx-n4"


def test_bad_survey_answers_change_nothing(lab_bastion, discovered, coll, tmp_path):
    b = lab_bastion
    credential = {"LAB_BASTION_URL": b.url, "LAB_BASTION_TOKEN": b.token}
    mac = "52:54:00:a0:00:09"
    requests.post(b.url + "/api/discover", json={"mac": mac}, timeout=10).raise_for_status()
    cases = [
        (f"{mac} bad;name", "expected MAC HOSTNAME [ROLE [OS [DISK]]]"),
        (f"{mac}", "expected MAC HOSTNAME"),
        ("", "nothing to install"),
    ]
    for text, needle in cases:
        r, _ = queue_playbook(coll, tmp_path, credential, _answers(lab_installs_text=text))
        assert r.returncode == 2 and needle in r.stdout, (text, r.stdout[-2000:])
    # no default role in the survey answers and none on the line
    r, _ = queue_playbook(coll, tmp_path, credential, {"lab_installs_text": f"{mac} ok-name"})
    assert r.returncode == 2 and "lab_install_role" in r.stdout
    # a credential naming several bastions needs the survey's Bastion URL
    several = {**credential, "LAB_BASTION_URL": f"{b.url},http://192.0.2.1:8080"}
    r, _ = queue_playbook(coll, tmp_path, several, _answers(lab_installs_text=f"{mac} awx-n9"))
    assert r.returncode == 2 and "names several bastions: set lab_bastion_url" in r.stdout
    assert _machine(b, mac)["state"] == "discovered"
    r, stats = queue_playbook(coll, tmp_path, several, _answers(lab_installs_text=f"{mac} awx-n9", lab_bastion_url=b.url))
    assert r.returncode == 0 and stats["changed"] == 1, r.stdout + r.stderr
    assert _machine(b, mac)["hostname"] == "awx-n9"


def test_without_a_credential_the_playbook_says_so(coll, tmp_path):
    env = {k: "" for k in ("LAB_BASTION_URL", "LAB_BASTION_TOKEN")}
    r, _ = queue_playbook(coll, tmp_path, env, _answers(lab_installs_text="52:54:00:a0:00:08 x1"))
    assert r.returncode == 2 and "no bastion URL: attach the lab bastion credential" in r.stdout
