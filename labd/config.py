"""labd's configuration: a command-line flag wins over the environment (LABD_*), which wins over
``<data dir>/labd.yaml``, which wins over the defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_NAME = "labd.yaml"
DATA_DIR_ENV = "LABD_DATA_DIR"
DATABASE_URL_ENV = "LABD_DATABASE_URL"
#: environment name of each setting (flags use the same names with dashes)
ENV = {"database_url": DATABASE_URL_ENV, "listen": "LABD_LISTEN", "workers": "LABD_WORKERS",
       "threads": "LABD_THREADS", "tls_cert": "LABD_TLS_CERT", "tls_key": "LABD_TLS_KEY",
       "token_ttl_seconds": "LABD_TOKEN_TTL_SECONDS", "pool_size": "LABD_POOL_SIZE",
       "hub_listen": "LABD_HUB_LISTEN", "hub_url": "LABD_HUB_URL",
       "bastion_cert_seconds": "LABD_BASTION_CERT_SECONDS", "agent_cert_seconds": "LABD_AGENT_CERT_SECONDS"}
INTS = {"workers", "threads", "token_ttl_seconds", "pool_size", "bastion_cert_seconds", "agent_cert_seconds"}
# lab-agent (issue 18): the heartbeat interval labd tells agents, and the beats missed before "offline"
ENV.update(agent_heartbeat_seconds="LABD_AGENT_HEARTBEAT_SECONDS", agent_missed_beats="LABD_AGENT_MISSED_BEATS")
INTS |= {"agent_heartbeat_seconds", "agent_missed_beats"}
# the join token a bastion asks for, for a machine it installs (labd/hub/bastion.py): its lifetime
ENV.update(install_agent_token_seconds="LABD_INSTALL_AGENT_TOKEN_SECONDS")
INTS |= {"install_agent_token_seconds"}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    data_dir: Path
    database_url: str = ""
    listen: str = "127.0.0.1:8443"
    workers: int = 2
    threads: int = 8
    tls_cert: str = ""  # default: <data dir>/server.crt, made by `labd init`
    tls_key: str = ""
    token_ttl_seconds: int = 12 * 3600  # an API token from a login
    pool_size: int = 8  # connections per gunicorn worker
    hub_listen: str = ""  # the hub's HOST:PORT (bastions and agents dial it); default: the API's port + 1
    hub_url: str = ""  # the hub's URL as peers reach it; default: wss://<the host they enrolled at>:<hub port>
    bastion_cert_seconds: int = 30 * 86400  # lifetime of a bastion's client certificate
    agent_cert_seconds: int = 14 * 86400  # lifetime of an agent's
    agent_heartbeat_seconds: int = 15
    agent_missed_beats: int = 3
    install_agent_token_seconds: int = 4 * 3600  # from the install's queueing to the agent's first join
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def cert_path(self) -> Path:
        return Path(self.tls_cert) if self.tls_cert else self.data_dir / "server.crt"

    @property
    def key_path(self) -> Path:
        return Path(self.tls_key) if self.tls_key else self.data_dir / "server.key"

    @property
    def ca_path(self) -> Path:
        return self.data_dir / "ca.crt"

    @property
    def secret_key_path(self) -> Path:
        return self.data_dir / "secret.key"

    @property
    def hub_address(self) -> tuple[str, int]:
        if self.hub_listen:
            host, _, port = self.hub_listen.rpartition(":")
            return host, int(port)
        host, _, port = self.listen.rpartition(":")
        return host, int(port) + 1

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError(f"no database URL: pass --database-url, set {DATABASE_URL_ENV} or put database_url "
                              f"in {self.data_dir / CONFIG_NAME}")
        return self.database_url


def load(data_dir: Path | str, env: dict | None = None, **flags) -> Config:
    data_dir = Path(data_dir)
    env = os.environ if env is None else env
    values: dict = {}
    path = data_dir / CONFIG_NAME
    if path.exists():
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: must be a mapping of settings")
        unknown = sorted(set(doc) - set(ENV))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(map(str, unknown))} (known: {', '.join(ENV)})")
        values.update(doc)
    values.update({k: env[name] for k, name in ENV.items() if env.get(name)})
    values.update({k: val for k, val in flags.items() if val is not None})
    for k in INTS & set(values):
        try:
            values[k] = int(values[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{k} must be an integer, not {values[k]!r}") from None
        if values[k] < 1:
            raise ConfigError(f"{k} must be at least 1")
    listen = str(values.get("listen", Config.listen))
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen must be HOST:PORT, not {listen!r}")
    hub = str(values.get("hub_listen") or "")
    if hub:
        host, _, port = hub.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"hub_listen must be HOST:PORT, not {hub!r}")
    return Config(data_dir=data_dir, **{k: (str(val) if k not in INTS else val) for k, val in values.items()})
