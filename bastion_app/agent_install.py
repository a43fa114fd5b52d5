"""lab-agent on the machines the bastion installs (docs/agent.md, "Installed machines").

When the bastion is enrolled in labd (`lab-bastion join`), its link asks labd for a join token
scoped to each machine it installs (bastion_app/link.py, labd/hub/bastion.py) and the install
script (image deploy, Fedora kickstart %post, Ubuntu late-commands: the shared
``scripts/_host-setup.sh.j2``) installs the agent from wheels the bastion serves
(``<data>/images/lab-agent/``, put there by `lab-bastion images agent-wheels DIR`), writes
roles/lab_agent's systemd unit (rendered from the role's own template and defaults: one home) and
a drop-in that joins labd at the first start with that token. Without a link identity, a token
or the wheels, :func:`context` is None and installs are unchanged.
"""

from __future__ import annotations

import ensurepip
import re
import shutil
import sysconfig
from pathlib import Path

import jinja2
import yaml

from labcore import enroll

#: under <data>/images (served as /images/lab-agent/<wheel>)
WHEELS_PATH = "lab-agent"
#: what the agent imports (lab_agent/, labcore.enroll and labcore.link): installed with --no-deps,
#: so an installed machine gets these, not the whole of lab-platform's requirements
REQUIREMENTS = ("lab-platform", "click", "cryptography", "cffi", "pycparser", "websockets", "requests", "urllib3",
                "idna", "charset-normalizer", "certifi")
_WHEEL = re.compile(r"[A-Za-z0-9_.+-]{1,200}\.whl")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,200}:sha256:[0-9a-f]{64}")  # labd.auth.new_token + labcore.enroll.format_join
_REPO = Path(__file__).resolve().parents[1]


class AgentWheelsError(ValueError):
    pass


def role_dir() -> Path:
    """roles/lab_agent: in the source tree, else in the copy of the collection the wheel ships."""
    from labctl.runner import BUNDLED

    for d in (_REPO / "roles" / "lab_agent", BUNDLED / "ansible_collections" / "lab" / "platform" / "roles" / "lab_agent"):
        if (d / "templates").is_dir():
            return d
    raise FileNotFoundError("roles/lab_agent is missing from this installation of lab-platform")


def role_settings() -> dict:
    """The role's defaults and private vars (its Jinja references resolved): the paths, the exec
    user and the binary, as the role would use them on a host."""
    d = role_dir()
    values = yaml.safe_load((d / "defaults" / "main.yml").read_text()) or {}
    for name, raw in (yaml.safe_load((d / "vars" / "main.yml").read_text()) or {}).items():
        values[name] = jinja2.Template(str(raw), undefined=jinja2.StrictUndefined).render(**values)
    return values


def unit_text(settings: dict | None = None) -> str:
    """roles/lab_agent's lab-agent.service, rendered with the role's settings."""
    settings = settings or role_settings()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(role_dir() / "templates")), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=False)
    env.filters["comment"] = lambda text: "\n".join(f"# {line}" for line in str(text).splitlines())
    text = env.get_template("etc/systemd/system/lab-agent.service.j2").render(
        ansible_managed="lab-platform: roles/lab_agent's unit, written by the bastion's installer (docs/agent.md)",
        **settings)
    return _heredoc_safe(text)


def join_dropin(settings: dict, hostname: str) -> str:
    """The drop-in that enrolls at the first start: labd's URL and the token from join.env (then
    deleted), the host name as labd should know it. A failed join (labd down) fails the start, and
    the unit's Restart= tries again."""
    state = settings["lab_agent_state_dir"]
    env_file = f"{state}/join.env"
    script = (f"if [ ! -e {state}/identity.json ]; then set -a; . {env_file}; set +a; "
              f"{settings['_lab_agent_bin']} join --state-dir {state} --name {hostname} && rm -f {env_file}; fi")
    if not re.fullmatch(r"[A-Za-z0-9_./ =;!&+\[\]-]+", script):  # systemd's own expansion ($, %) must not apply
        raise ValueError(f"unexpected characters in the join step: {script!r}")
    return _heredoc_safe("\n".join([
        "# lab-platform: enroll with labd at the first start (a join token for this machine, one use; docs/agent.md)",
        "[Service]",
        f"ExecStartPre=/bin/sh -c '{script}'",
    ]))


def _heredoc_safe(text: str) -> str:
    for line in text.splitlines():
        if line.strip() == "LAB_EOF" or line.lstrip().startswith("%"):
            raise ValueError(f"a line of the agent's unit would end the install script's here-document: {line!r}")
    return text


def wheels(images_path: Path) -> list[str] | None:
    """The wheels the bastion serves for agents (names checked), or None without lab-platform's
    wheel and pip's."""
    d = Path(images_path) / WHEELS_PATH
    if not d.is_dir():
        return None
    names = sorted(p.name for p in d.iterdir() if p.is_file() and _WHEEL.fullmatch(p.name))
    if not any(n.startswith("lab_platform-") for n in names) or not any(n.startswith("pip-") for n in names):
        return None
    return names


def python_pip_wheel() -> Path | None:
    """The pip wheel this Python ships: ensurepip's own copy (python.org builds), or the
    distribution's (Debian's python3-pip-whl and Fedora's python3-pip-wheel put it in the
    ``WHEEL_PKG_DIR`` their ensurepip reads, /usr/share/python-wheels)."""
    wheel_dir = sysconfig.get_config_var("WHEEL_PKG_DIR")
    dirs = [Path(ensurepip.__file__).parent / "_bundled", *([Path(wheel_dir)] if wheel_dir else [])]
    found = [p for d in dirs for p in sorted(d.glob("pip-*.whl")) if _WHEEL.fullmatch(p.name)]
    return found[-1] if found else None


def install_wheels(source: Path, images_path: Path) -> list[str]:
    """Copy a wheelhouse (`labctl init bastion wheelhouse DIR`) to <images>/lab-agent, adding pip's
    wheel from this Python when the wheelhouse has none (:func:`python_pip_wheel`). The old wheels
    are replaced."""
    found = sorted(p for p in Path(source).glob("*.whl") if _WHEEL.fullmatch(p.name))
    if not any(p.name.startswith("lab_platform-") for p in found):
        raise AgentWheelsError(f"{source} has no lab_platform-*.whl: build it with `labctl init bastion wheelhouse {source}`")
    if not any(p.name.startswith("pip-") for p in found):
        bundled = python_pip_wheel()
        if bundled is None:
            raise AgentWheelsError(f"{source} has no pip-*.whl and this Python has no pip wheel of its own: add pip's "
                                   f"wheel (`pip download --no-deps -d {source} pip`)")
        found.append(bundled)
    dest = Path(images_path) / WHEELS_PATH
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in found:
        shutil.copy2(p, tmp / p.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return [p.name for p in found]


def _labd_url(cfg) -> str | None:
    labd = str(enroll.load_meta(cfg.link_path).get("labd") or "").rstrip("/")
    return labd if re.fullmatch(r"https://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._/-]*)?", labd) else None


def _token(store, m: dict, cfg) -> str | None:
    if not m.get("install_token") or not enroll.has_identity(cfg.link_path):
        return None
    token = store.agent_token(m["mac"], m["install_token"])
    return token if token and _TOKEN.fullmatch(token) else None


def join_env(store, m: dict, cfg) -> str | None:
    """The environment file of the agent's first join (POST /api/agent-join): labd's URL and this
    install's join token; None when there is none."""
    token, labd = _token(store, m, cfg), _labd_url(cfg) if enroll.has_identity(cfg.link_path) else None
    if not token or not labd:
        return None
    return f"LAB_AGENT_LABD={labd}\nLAB_AGENT_TOKEN={token}\n"


def context(store, m: dict, cfg) -> dict | None:
    """What ``scripts/_agent.sh.j2`` needs for machine record ``m``, or None (installs unchanged):
    the bastion is not enrolled, labd gave no token for this install (yet), or no wheels. The
    token itself is not in it: the script fetches it with the install's own token (join_env)."""
    names = wheels(cfg.images_path)
    if not names or not _token(store, m, cfg) or not _labd_url(cfg):
        return None
    return script_context(names, m["hostname"])


def script_context(names: list[str], hostname: str) -> dict:
    """The template's values for a machine named ``hostname``, with the wheels ``names`` served."""
    wanted = {r.replace("_", "-") for r in REQUIREMENTS} | {"pip"}
    names = [n for n in names if n.split("-", 1)[0].lower().replace("_", "-") in wanted]  # only what pip will install
    s = role_settings()
    return {"wheels": names, "wheels_path": WHEELS_PATH,
            "pip_wheel": next(n for n in names if n.startswith("pip-")), "requirements": REQUIREMENTS,
            "install_dir": s["lab_agent_install_dir"], "venv": s["_lab_agent_venv"], "state_dir": s["lab_agent_state_dir"],
            "exec_user": s["lab_agent_exec_user"], "exec_home": s["_lab_agent_exec_home"],
            "unit": unit_text(s), "join_dropin": join_dropin(s, hostname)}
