"""The bastion's Flask application."""

from __future__ import annotations

import logging
import os

from flask import Flask

from labcore import bastion_config as configmod


def create_app(cfg: configmod.Config | None = None, test_config: dict | None = None) -> Flask:
    """Build the app. Without ``cfg`` the configuration is loaded from LAB_BASTION_DATA_DIR (as
    gunicorn workers do); every worker builds its own app and store connections."""
    from bastion_app import auth, errors, limits, metrics
    from bastion_app.logstore import LogStore
    from bastion_app.routes import api, boot, logs, ops
    from bastion_app.store import Store

    if cfg is None:
        cfg = configmod.load(os.environ.get(configmod.DATA_DIR_ENV))
    app = Flask(__name__)
    app.config.update(
        LAB=cfg,
        LAB_TOKEN=auth.ensure_token(cfg.token_path),
        MAX_CONTENT_LENGTH=cfg.max_body_bytes,
        JSON_SORT_KEYS=False,
    )
    if test_config:
        app.config.update(test_config)
    store = Store.from_config(cfg)
    store.close()  # no connection or lock crosses a fork (gunicorn preloads the app, then forks)
    app.extensions["lab_store"] = store
    app.extensions["lab_logs"] = LogStore.from_config(cfg)  # closes its connection itself, for the same reason
    app.json.sort_keys = False
    errors.register(app)
    metrics.init_app(app)
    limits.init_app(app, cfg)
    app.register_blueprint(boot.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(logs.bp)
    from bastion_app.routes import artefacts, installer

    app.register_blueprint(installer.bp)
    app.register_blueprint(artefacts.bp)
    from bastion_app import console

    console.init_app(app)
    logging.getLogger("bastion_app").setLevel(logging.INFO)
    return app


def get_store():
    from flask import current_app

    return current_app.extensions["lab_store"]


def get_logs():
    """The app's :class:`~bastion_app.logstore.LogStore` (install logs, ``logs.db``)."""
    from flask import current_app

    return current_app.extensions["lab_logs"]
