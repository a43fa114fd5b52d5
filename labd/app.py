"""labd's Flask application (the routes are in labd/api.py)."""

from __future__ import annotations

import logging

from flask import Flask

from labd import config as configmod


def create_app(cfg: configmod.Config, test_config: dict | None = None) -> Flask:
    """Build the app. The store's pool opens on first use, in the worker: gunicorn preloads this
    app in its master and forks, and no connection may cross a fork."""
    from bastion_app import errors as bastion_errors
    from labd import agent_api, api, errors, link_api, metrics
    from labd.store import Store

    app = Flask(__name__)
    app.config.update(LABD=cfg, MAX_CONTENT_LENGTH=2 * 2**20)
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False
    app.extensions["labd_store"] = Store(cfg.require_database(), max_size=cfg.pool_size)
    bastion_errors.register(app)  # the bastion's JSON error shape and handlers
    errors.register(app)  # and labd's own (the database's errors)
    metrics.init_app(app)
    app.register_blueprint(api.public)
    app.register_blueprint(link_api.public)
    assert agent_api.bp is api.bp  # the agent routes live on the API blueprint
    app.register_blueprint(api.bp)
    from labd import console

    console.init_app(app)  # the web console (docs/console.md, "Under labd")
    logging.getLogger("labd").setLevel(logging.INFO)
    return app
