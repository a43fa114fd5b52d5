"""GET /images/<path>: boot artefacts (installer kernels, initrds, stage2, ISOs, the discovery
image) from <data>/images, served by the bastion itself so install scripts never reach out to the
Internet.

Under `lab-bastion serve` the route only checks the request and hands the file to the nginx front
(``X-Accel-Redirect`` to its internal artefacts location): nginx sends it with sendfile(2) and
answers Range and conditional requests, and no gunicorn thread waits for a slow reader
(bastion_app/front.py). Without the front (the app on its own), Werkzeug's send_file does the same
in the worker. Artefacts are public distribution files: no install
token is needed (the iPXE scripts append ?token=, which is ignored), so discovery and rescue boots
work too. In-progress downloads (*.part) and dot files are never served.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, current_app, send_file
from werkzeug.security import safe_join

from bastion_app.errors import ApiError
from bastion_app.routes import cfg

bp = Blueprint("artefacts", __name__)


def artefact_path(root: Path, name: str) -> Path:
    """The file under ``root`` that ``name`` names, or ApiError 404."""
    parts = name.split("/")
    if any(p == "" or p.startswith(".") for p in parts) or name.endswith(".part"):
        raise ApiError(404, "no such artefact", {"path": name})
    joined = safe_join(str(root), name)
    if joined is None:
        raise ApiError(404, "no such artefact", {"path": name})
    path = Path(joined)
    try:
        resolved = path.resolve(strict=True)
        resolved.relative_to(root.resolve())
    except (OSError, ValueError):
        raise ApiError(404, "no such artefact", {"path": name}) from None
    if not resolved.is_file():
        raise ApiError(404, "no such artefact", {"path": name})
    return resolved


@bp.get("/images/<path:name>")
def artefact(name: str):
    path = artefact_path(cfg().images_path, name)
    accel = current_app.config.get("LAB_ARTEFACTS_ACCEL")
    if accel:
        resp = Response(status=200, mimetype="application/octet-stream")
        resp.headers["X-Accel-Redirect"] = accel + quote(path.relative_to(cfg().images_path.resolve()).as_posix())
        return resp
    resp = send_file(path, mimetype="application/octet-stream", conditional=True, etag=True, max_age=0)
    resp.headers["Accept-Ranges"] = "bytes"
    return resp
