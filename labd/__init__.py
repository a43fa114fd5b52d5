"""labd: the central daemon of a lab with several bastions (PostgreSQL store, users, RBAC, audit).

SQL stays inside what CockroachDB also accepts (docs/labd.md, "CockroachDB rules"): UUID keys, no
sequences, no LISTEN/NOTIFY, no advisory locks, one DDL statement per migration step, and every
transaction retried on serialization failures (SQLSTATE 40001).
"""
