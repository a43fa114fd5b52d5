"""Shared model of lab-platform: machine states, the lifecycle table, validation, API schemas.

Nothing here knows about HTTP, Flask or the database; the bastion (and later labd) build on it.
"""
