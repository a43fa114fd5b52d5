"""The start of the stdlib Python scripts the verify tests run on the VM (``python3 -c``): log in to
labd on this host as its admin (the password file is the script's first argument), verified with
labd's own CA, and ``call(path, body, token)`` for its API; ``token`` is the admin's session."""

LOGIN = r"""
import json, ssl, sys, time, urllib.request
base = "https://127.0.0.1:8443"
ctx = ssl.create_default_context(cafile="/var/lib/labd/ca.crt")
def call(path, body=None, token=None):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": "Bearer " + token} if token else {})})
    return json.load(urllib.request.urlopen(req, context=ctx, timeout=20))
token = call("/api/v1/login", {"username": "admin", "password": open(sys.argv[1]).read().strip()})["token"]
"""
