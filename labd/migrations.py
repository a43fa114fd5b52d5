"""labd's schema: ordered migration steps, each exactly one statement (CockroachDB runs DDL one
statement per transaction). A step's id is recorded in ``schema_migrations`` after it ran; every
step is idempotent (IF NOT EXISTS), so a step that ran but was not recorded (a crash in between)
runs again harmlessly. Never edit a released step: append a new one.
"""

from __future__ import annotations

import psycopg

STEPS: list[tuple[str, str]] = [
    ("0001_users", """CREATE TABLE IF NOT EXISTS users (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        name TEXT NOT NULL UNIQUE,
        password_hash TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now())"""),
    ("0002_roles", """CREATE TABLE IF NOT EXISTS roles (
        name TEXT PRIMARY KEY,
        builtin BOOLEAN NOT NULL DEFAULT false,
        description TEXT NOT NULL DEFAULT '',
        rules JSONB NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now())"""),
    ("0003_role_bindings", """CREATE TABLE IF NOT EXISTS role_bindings (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        username TEXT NOT NULL,
        role TEXT NOT NULL,
        scope TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        UNIQUE (username, role, scope))"""),
    ("0004_tokens", """CREATE TABLE IF NOT EXISTS tokens (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        kind TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        username TEXT,
        scope TEXT NOT NULL,
        uses_left INT,
        expires_at TIMESTAMPTZ NOT NULL,
        revoked_at TIMESTAMPTZ,
        created_by TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now())"""),
    ("0005_servers", """CREATE TABLE IF NOT EXISTS servers (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        mac TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        hostname TEXT UNIQUE,
        role TEXT,
        os TEXT,
        disk TEXT NOT NULL DEFAULT '',
        ssh_keys JSONB NOT NULL DEFAULT '[]',
        ip TEXT,
        hardware JSONB NOT NULL DEFAULT '{}',
        stage TEXT,
        percent INT,
        message TEXT,
        failure TEXT,
        stalled BOOLEAN NOT NULL DEFAULT false,
        debug TEXT,
        bastion TEXT,
        cloud TEXT NOT NULL,
        environment TEXT NOT NULL,
        labels JSONB NOT NULL DEFAULT '{}',
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        state_changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        last_seen_at TIMESTAMPTZ,
        install_started_at TIMESTAMPTZ,
        last_progress_at TIMESTAMPTZ,
        installed_at TIMESTAMPTZ)"""),
    ("0006_servers_scope_idx", "CREATE INDEX IF NOT EXISTS servers_scope_idx ON servers (cloud, environment, mac)"),
    ("0007_servers_bastion_idx", "CREATE INDEX IF NOT EXISTS servers_bastion_idx ON servers (bastion, mac)"),
    ("0008_bastions", """CREATE TABLE IF NOT EXISTS bastions (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        name TEXT NOT NULL UNIQUE,
        cloud TEXT NOT NULL,
        environment TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'never-connected',
        last_seen_at TIMESTAMPTZ,
        version TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now())"""),
    ("0009_agents", """CREATE TABLE IF NOT EXISTS agents (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        hostname TEXT NOT NULL UNIQUE,
        server TEXT,
        cloud TEXT NOT NULL,
        environment TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        last_seen_at TIMESTAMPTZ,
        version TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now())"""),
    ("0010_clusters", """CREATE TABLE IF NOT EXISTS clusters (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        name TEXT NOT NULL UNIQUE,
        cloud TEXT NOT NULL,
        environment TEXT NOT NULL,
        members JSONB NOT NULL DEFAULT '[]',
        kubeconfig TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"""),
    ("0011_audit", """CREATE TABLE IF NOT EXISTS audit (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        ts TIMESTAMPTZ NOT NULL DEFAULT now(),
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        outcome TEXT NOT NULL,
        status INT NOT NULL,
        detail JSONB NOT NULL DEFAULT '{}')"""),
    ("0012_audit_ts_idx", "CREATE INDEX IF NOT EXISTS audit_ts_idx ON audit (ts, id)"),
    # -- issue 17 (bastions join labd): 01xx ----------------------------------------------------------
    ("0101_commands", """CREATE TABLE IF NOT EXISTS commands (
        id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
        target_kind TEXT NOT NULL,
        target_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        args JSONB NOT NULL DEFAULT '{}',
        state TEXT NOT NULL DEFAULT 'queued',
        result JSONB,
        created_by TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        deliver_after_reconnect BOOLEAN NOT NULL DEFAULT false)"""),
    ("0102_commands_target_idx", "CREATE INDEX IF NOT EXISTS commands_target_idx ON commands (target_kind, target_id, state, created_at)"),
    ("0103_certificates", """CREATE TABLE IF NOT EXISTS certificates (
        fingerprint TEXT PRIMARY KEY,
        peer_kind TEXT NOT NULL,
        peer_id TEXT NOT NULL,
        not_after TIMESTAMPTZ NOT NULL,
        revoked_at TIMESTAMPTZ,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now())"""),
    ("0104_bastions_link", "ALTER TABLE bastions ADD COLUMN IF NOT EXISTS revoked_at TIMESTAMPTZ"),
    ("0105_bastions_token", "ALTER TABLE bastions ADD COLUMN IF NOT EXISTS facts JSONB NOT NULL DEFAULT '{}'"),
    ("0106_bastion_events", """CREATE TABLE IF NOT EXISTS bastion_events (
        bastion TEXT NOT NULL,
        event_id BIGINT NOT NULL,
        mac TEXT,
        ts TEXT,
        kind TEXT NOT NULL,
        body JSONB NOT NULL DEFAULT '{}',
        received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (bastion, event_id))"""),
    ("0107_servers_version", "ALTER TABLE servers ADD COLUMN IF NOT EXISTS bastion_version BIGINT"),
    ("0108_bastions_counters", "ALTER TABLE bastions ADD COLUMN IF NOT EXISTS acked_event_id BIGINT NOT NULL DEFAULT 0"),
    ("0109_bastions_changes", "ALTER TABLE bastions ADD COLUMN IF NOT EXISTS acked_change BIGINT NOT NULL DEFAULT 0"),
    ("0110_bastions_backlog", "ALTER TABLE bastions ADD COLUMN IF NOT EXISTS backlog BIGINT NOT NULL DEFAULT 0"),
    ("0111_server_claims", """CREATE TABLE IF NOT EXISTS server_claims (
        mac TEXT NOT NULL,
        bastion TEXT NOT NULL,
        version BIGINT NOT NULL,
        row JSONB NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (mac, bastion))"""),
    ("0112_bastions_machines", "ALTER TABLE bastions ADD COLUMN IF NOT EXISTS machines INT NOT NULL DEFAULT 0"),
    # the hub's poll (every 10 ms) reads only the queued commands
    ("0113_commands_queued_idx", "CREATE INDEX IF NOT EXISTS commands_queued_idx ON commands (created_at) WHERE state = 'queued'"),
    # a bastion's claims (its machine count) without a scan, which under SERIALIZABLE would conflict
    # with every other bastion's batch
    ("0114_server_claims_bastion_idx", "CREATE INDEX IF NOT EXISTS server_claims_bastion_idx ON server_claims (bastion, mac)"),
    # -- issue 18 (lab-agent): 02xx ---------------------------------------------------------------------
    ("0201_agents_facts", "ALTER TABLE agents ADD COLUMN IF NOT EXISTS facts JSONB NOT NULL DEFAULT '{}'"),
    ("0202_agents_revoked", "ALTER TABLE agents ADD COLUMN IF NOT EXISTS revoked_at TIMESTAMPTZ"),
    ("0203_command_output", """CREATE TABLE IF NOT EXISTS command_output (
        command_id UUID NOT NULL,
        seq INT NOT NULL,
        stream TEXT NOT NULL,
        data JSONB NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (command_id, seq))"""),
]

_LEDGER = """CREATE TABLE IF NOT EXISTS schema_migrations (
    id TEXT PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""


def applied(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT id FROM schema_migrations").fetchall()}


def migrate(url: str) -> list[str]:
    """Run the steps not yet recorded, in order, each in its own transaction; returns their ids."""
    done = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_LEDGER)
        have = applied(conn)
        for step_id, statement in STEPS:
            if step_id in have:
                continue
            conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (id) VALUES (%s) ON CONFLICT (id) DO NOTHING", (step_id,))
            done.append(step_id)
    return done


def pending(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_LEDGER)
        have = applied(conn)
    return [s for s, _ in STEPS if s not in have]
