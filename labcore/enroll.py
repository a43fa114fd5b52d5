"""Enrollment of a bastion or an agent with labd (no Flask, no server code).

A join token, as `labctl create token --kind bastion|agent` prints it, carries labd's CA pin:

    <secret>:sha256:<hex of the CA certificate's SHA-256>

The host makes its own EC P-256 key (it never leaves the host), sends a CSR with the token to
``POST /api/v1/enroll`` and stores the certificate labd's CA signed. Before sending anything it
fetches labd's CA (``GET /api/v1/ca``, unverified: nothing is trusted yet) and refuses to go on
unless the CA's fingerprint equals the pin; the enroll request itself is then verified against
that CA, so a man in the middle can neither read the token nor hand out a certificate.

The identity directory (0700) holds ``key.pem`` (0600), ``cert.pem``, ``ca.pem`` and
``identity.json`` (id, kind, name, hub URL), all 0600.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from labcore import private

FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
KEY_FILE, CERT_FILE, CA_FILE, META_FILE = "key.pem", "cert.pem", "ca.pem", "identity.json"
KINDS = ("bastion", "agent")


class EnrollError(Exception):
    """Enrollment refused or impossible; the message says why, for an operator."""


def fingerprint(cert_pem: bytes | str) -> str:
    """``sha256:<hex>`` of a PEM certificate (the first one in the text)."""
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode()
    cert = x509.load_pem_x509_certificate(cert_pem)
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def format_join(secret: str, ca_fingerprint: str) -> str:
    if not FINGERPRINT_RE.fullmatch(ca_fingerprint):
        raise ValueError(f"not a CA fingerprint: {ca_fingerprint!r}")
    if not secret or ":" in secret or any(c.isspace() for c in secret):
        raise ValueError("a token secret has no ':' and no white space")
    return f"{secret}:{ca_fingerprint}"


def parse_join(join: str) -> tuple[str, str]:
    """``(secret, ca_fingerprint)``; EnrollError when the text is not a join token."""
    join = (join or "").strip()
    secret, sep, fp = join.partition(":")
    if not sep or not secret or not FINGERPRINT_RE.fullmatch(fp) or any(c.isspace() for c in secret):
        raise EnrollError("not a join token: expected <secret>:sha256:<64 hex digits> "
                          "as `labctl create token --kind bastion` prints it")
    return secret, fp


def new_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PEM, unencrypted PKCS#8) and a CSR for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "lab")]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _fetch_ca(labd_url: str, timeout: float) -> bytes:
    import requests
    import urllib3

    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        try:
            r = requests.get(f"{labd_url}/api/v1/ca", verify=False, timeout=timeout)  # noqa: S501 - pinned below
        except requests.RequestException as exc:
            raise EnrollError(f"cannot reach labd at {labd_url}: {exc}") from None
    if r.status_code != 200:
        raise EnrollError(f"{labd_url}/api/v1/ca answered {r.status_code}: is this labd?")
    return r.content


def enroll(labd_url: str, join: str, kind: str, name: str, facts: dict | None = None, *,
           csr_pem: bytes | None = None, timeout: float = 30.0) -> dict:
    """Enroll with labd. Returns labd's answer ``{"id","certificate","ca","expires_at","status","hub"}``;
    when no ``csr_pem`` is given a key is made here and returned as ``"key"`` (PEM, never sent)."""
    import requests

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    secret, pin = parse_join(join)
    labd_url = labd_url.rstrip("/")
    ca_pem = _fetch_ca(labd_url, timeout)
    try:
        got = fingerprint(ca_pem)
    except ValueError:
        raise EnrollError(f"{labd_url}/api/v1/ca did not answer a PEM certificate") from None
    if got != pin:
        raise EnrollError(f"labd's CA does not match the join token's pin: the token pins {pin}, "
                          f"{labd_url} presents {got}; refusing to send the token (wrong labd, or a man in the middle)")
    key_pem = None
    if csr_pem is None:
        key_pem, csr_pem = new_key_and_csr(f"{kind}:{name}")
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as ca_file:
        ca_file.write(ca_pem)
        ca_file.flush()
        try:
            r = requests.post(f"{labd_url}/api/v1/enroll", verify=ca_file.name, timeout=timeout,
                              json={"token": secret, "kind": kind, "name": name, "csr": csr_pem.decode(),
                                    "facts": facts or {}})
        except requests.RequestException as exc:
            raise EnrollError(f"enroll at {labd_url} failed: {exc}") from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code not in (200, 201):
        detail = body.get("detail")
        raise EnrollError(f"labd refused the enrollment ({r.status_code}): {body.get('error', r.text[:200])}"
                          + (f": {detail}" if detail else ""))
    out = {k: body.get(k) for k in ("id", "certificate", "ca", "expires_at", "status", "hub")}
    if key_pem is not None:
        out["key"] = key_pem
    return out


def _b(v: bytes | str) -> bytes:
    return v.encode() if isinstance(v, str) else v


def store_identity(directory: Path | str, key_pem: bytes | str, cert_pem: bytes | str, ca_pem: bytes | str,
                   meta: dict | None = None) -> Path:
    """Write the identity files (0600) into ``directory`` (made 0700). The certificate is written
    after the key, each atomically, so a crash leaves the old pair or a key ahead of its certificate
    (which :func:`load_identity` detects)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    private.write(d / CA_FILE, ca_pem)
    private.write(d / KEY_FILE, key_pem)
    private.write(d / CERT_FILE, cert_pem)
    if meta is not None:
        private.write(d / META_FILE, json.dumps(meta, sort_keys=True).encode())
    return d


def has_identity(directory: Path | str) -> bool:
    d = Path(directory)
    return all((d / f).exists() for f in (KEY_FILE, CERT_FILE, CA_FILE, META_FILE))


def load_meta(directory: Path | str) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())


def cert_times(cert_pem: bytes | str) -> tuple[dt.datetime, dt.datetime]:
    cert = x509.load_pem_x509_certificate(_b(cert_pem))
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def cert_subject(cert_pem: bytes | str) -> str:
    cert = x509.load_pem_x509_certificate(_b(cert_pem))
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def renew_due(cert_pem: bytes | str, now: dt.datetime | None = None, *, rng: random.Random | None = None) -> bool:
    """True once about 2/3 of the certificate's lifetime has passed (a jitter of up to 5 % of the
    lifetime earlier, so a fleet enrolled together does not renew in one burst)."""
    start, end = cert_times(cert_pem)
    now = now or dt.datetime.now(dt.UTC)
    life = (end - start).total_seconds()
    jitter = (rng or random).uniform(0, 0.05) * life
    return (now - start).total_seconds() >= life * 2 / 3 - jitter
