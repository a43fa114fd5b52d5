"""`labd`: the central daemon of a lab with several bastions.

    labd init --data-dir D [--database-url URL] [--admin NAME]   schema, CA, certificates, first admin
    labd serve --data-dir D --listen HOST:PORT                   the HTTPS API (gunicorn + Flask)
    labd migrate --data-dir D                                    run the schema steps not yet applied

The database URL comes from --database-url, else LABD_DATABASE_URL, else `database_url` in
D/labd.yaml.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import click

from labcore import private
from labd import config as configmod
from labd.schemas import NAME_PATTERN

data_dir_option = click.option("--data-dir", envvar=configmod.DATA_DIR_ENV, required=True,
                               type=click.Path(file_okay=False, path_type=Path),
                               help="labd's data directory (mode 0700: CA and server keys, secret.key, labd.yaml). Env: LABD_DATA_DIR.")
database_option = click.option("--database-url", metavar="URL",
                               help="PostgreSQL (or CockroachDB) URL, e.g. postgresql://labd@db/labd. Env: LABD_DATABASE_URL.")


def _load(data_dir: Path, **flags) -> configmod.Config:
    try:
        cfg = configmod.load(data_dir, **flags)
        cfg.require_database()
        return cfg
    except configmod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """labd: servers, bastions, agents and clusters of a whole lab, with users, RBAC and audit."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@data_dir_option
@database_option
@click.option("--admin", default="admin", show_default=True, metavar="NAME", help="Name of the first admin user.")
@click.option("--san", multiple=True, metavar="NAME|IP", help="Another name or address for the server certificate (repeatable).")
@click.option("--force", is_flag=True, help="Run on a database that already has users: reset the admin's password "
              "(prints a new one) and keep everything else.")
def init(data_dir, database_url, admin, san, force):
    """Create the schema (migrations), the built-in roles, the first admin user and its one-time
    password (printed once: `admin password: ...`), and the data directory (0700) with labd's CA,
    its server certificate and the key that seals kubeconfigs."""
    import psycopg
    from psycopg.types.json import Jsonb

    from labcore import secretbox
    from labd import auth, migrations, rbac, tls

    if not re.fullmatch(NAME_PATTERN, admin):
        raise click.ClickException(f"--admin {admin!r}: letters, digits, '.', '_' and '-' only")
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    cfg = _load(data_dir, database_url=database_url)
    try:
        migrations.migrate(cfg.database_url)
        with psycopg.connect(cfg.database_url) as conn:
            users = conn.execute("SELECT count(*) FROM users").fetchone()[0]
            if users and not force:
                raise click.ClickException("this database is initialised already (it has users); "
                                           "`labd init --force` resets the admin's password")
            password = auth.new_password()
            hashed = auth.hash_password(password)
            with conn.transaction():
                for name, spec in rbac.BUILTIN_ROLES.items():
                    conn.execute("INSERT INTO roles (name, builtin, description, rules) VALUES (%s, true, %s, %s) "
                                 "ON CONFLICT (name) DO UPDATE SET builtin = true, description = excluded.description, "
                                 "rules = excluded.rules", (name, spec["description"], Jsonb(spec["rules"])))
                conn.execute("INSERT INTO users (name, password_hash) VALUES (%s, %s) ON CONFLICT (name) "
                             "DO UPDATE SET password_hash = excluded.password_hash", (admin, hashed))
                conn.execute("INSERT INTO role_bindings (username, role, scope) VALUES (%s, 'admin', '*') "
                             "ON CONFLICT (username, role, scope) DO NOTHING", (admin,))
                conn.execute("INSERT INTO audit (actor, action, resource, outcome, status) VALUES ('labd init', %s, %s, 'allowed', 200)",
                             ("users.reset-password" if users else "users.create", f"users/{admin}"))
    except psycopg.Error as exc:
        raise click.ClickException(f"database {_safe_url(cfg.database_url)}: {exc}") from None
    tls.make_ca(data_dir)
    if not (data_dir / "server.crt").exists() or san:
        tls.make_server_cert(data_dir, list(san))
    secretbox.load_or_create_key(cfg.secret_key_path)
    yaml_path = data_dir / configmod.CONFIG_NAME
    if database_url and not yaml_path.exists():  # so that `serve` and `migrate` find it
        private.create_once(yaml_path, lambda: f"database_url: {_yaml_str(database_url)}\n")
    click.echo(f"labd: initialised {data_dir}; CA fingerprint {tls.fingerprint(cfg.ca_path.read_bytes())}", err=True)
    click.echo(f"admin password: {password}")  # one line, whatever --admin is called: scripts read it


def _yaml_str(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a YAML string: no line or key can be injected


def _safe_url(url: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - only for a message
        return "(unparsable URL)"
    return f"{d.get('host', '')}/{d.get('dbname', '')}"


@main.command()
@data_dir_option
@database_option
def migrate(data_dir, database_url):
    """Run the schema migration steps not yet applied (each one statement, recorded in schema_migrations)."""
    from labd import migrations

    cfg = _load(data_dir, database_url=database_url)
    done = migrations.migrate(cfg.database_url)
    click.echo(f"applied {len(done)} step(s)" + (f": {', '.join(done)}" if done else " (up to date)"))


@main.command()
@data_dir_option
@database_option
@click.option("--listen", metavar="HOST:PORT", help="HTTPS address (default 127.0.0.1:8443). Env: LABD_LISTEN.")
@click.option("--workers", type=int, help="gunicorn worker processes (default 2).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Certificate (PEM chain) instead of labd's own server.crt.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Its private key (instead of server.key).")
@click.option("--hub-listen", metavar="HOST:PORT", help="Address of the hub bastions and agents dial (mTLS WebSocket; "
              "default: the API's host and port + 1). Env: LABD_HUB_LISTEN.")
@click.option("--no-hub", is_flag=True, help="Serve the API only (another `labd serve` runs the hub).")
def serve(data_dir, database_url, listen, workers, tls_cert, tls_key, hub_listen, no_hub):
    """Serve the HTTPS API (gunicorn, gthread workers, each with its own connection pool) and,
    beside it, the hub (a child process, restarted if it dies; it shares only the database)."""
    import tempfile

    from labd.gunicorn_app import LabdGunicorn

    cfg = _load(data_dir, database_url=database_url, listen=listen, workers=workers, tls_cert=tls_cert, tls_key=tls_key,
                hub_listen=hub_listen)
    for p in (cfg.cert_path, cfg.key_path):
        if not p.exists():
            raise click.ClickException(f"{p} does not exist: run `labd init --data-dir {data_dir}` or pass --tls-cert/--tls-key")
    if not no_hub:
        _start_hub(cfg)
    with tempfile.TemporaryDirectory(prefix="labd-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        click.echo(f"labd: serving https://{cfg.listen} from {data_dir}", err=True)
        LabdGunicorn(cfg).run()
    sys.exit(0)


def _start_hub(cfg: configmod.Config) -> None:
    """Run ``python -m labd.hub`` with this configuration, restarted (after a second) whenever it
    exits; it gets SIGTERM when this process dies, however it dies."""
    import subprocess
    import threading
    import time

    from bastion_app.supervisor import _die_with_parent

    env = dict(os.environ)
    env.update({configmod.DATA_DIR_ENV: str(cfg.data_dir), configmod.DATABASE_URL_ENV: cfg.database_url,
                "LABD_LISTEN": cfg.listen, "LABD_TLS_CERT": str(cfg.cert_path), "LABD_TLS_KEY": str(cfg.key_path),
                "LABD_HUB_LISTEN": "{}:{}".format(*cfg.hub_address)})
    host, port = cfg.hub_address
    click.echo(f"labd: hub on wss://{host}:{port}", err=True)

    def keep():  # this thread lives as long as the process: PR_SET_PDEATHSIG follows the thread that forked
        while True:
            proc = subprocess.Popen([sys.executable, "-m", "labd.hub"], env=env, preexec_fn=_die_with_parent)
            code = proc.wait()
            logging.getLogger("labd").warning("labd: the hub exited with status %s; restarting it", code)
            time.sleep(1)
    threading.Thread(target=keep, name="hub", daemon=True).start()


if __name__ == "__main__":
    main()
