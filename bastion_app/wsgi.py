"""WSGI entry point for gunicorn workers: the config comes from LAB_BASTION_DATA_DIR and the
LAB_BASTION_* environment that `lab-bastion serve` passes down; behind its nginx front (always,
under `serve`) the client's address and artefact downloads are the front's (bastion_app.front)."""

import os

from bastion_app import create_app, front

app = create_app()
if os.environ.get(front.UPSTREAM_ENV):
    front.behind_front(app)
