"""WSGI entry point for gunicorn workers: the config comes from LAB_BASTION_DATA_DIR and the
LAB_BASTION_* environment that `lab-bastion serve` passes down."""

from bastion_app import create_app

app = create_app()
