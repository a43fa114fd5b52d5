"""Client certificates of bastions and agents, signed by labd's CA (labd/tls.py made it).

- A peer sends a CSR; its key never leaves it. labd signs a certificate whose subject labd
  chooses (CN ``bastion:<uuid>`` or ``agent:<uuid>``, O = the kind), never the CSR's subject:
  the peer's identity on the hub is this CN, never a field of a message.
- Lifetimes come from the configuration (bastion 30 days, agent 14 days by default); the peer
  renews in-band at about 2/3 of it (labcore.enroll.renew_due) with a new key.
- Every certificate is recorded (``certificates``: fingerprint, peer, not_after, revoked_at); the
  hub refuses a certificate that is revoked or whose peer was deleted, at every connect.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from labcore.enroll import fingerprint

KINDS = ("bastion", "agent")
_CN = re.compile(r"^(bastion|agent):([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


class CsrError(ValueError):
    pass


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, TypeError):
        raise CsrError("csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CsrError("the CSR's signature does not verify (it must be signed by the key it carries)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise CsrError("EC keys of at least 256 bits only")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CsrError("RSA keys of at least 2048 bits only")
    else:
        raise CsrError("EC (P-256 or larger) or RSA (2048 bits or more) keys only")
    return csr


def sign(data_dir: Path, csr: x509.CertificateSigningRequest, kind: str, peer_id: str,
         lifetime_seconds: int) -> tuple[str, str, dt.datetime]:
    """``(certificate PEM, its fingerprint, not_after)`` for the CSR's key, CN ``<kind>:<peer_id>``."""
    if kind not in KINDS:
        raise ValueError(kind)
    uuid.UUID(peer_id)
    ca_key = serialization.load_pem_private_key((data_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((data_dir / "ca.crt").read_bytes())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = now + dt.timedelta(seconds=lifetime_seconds)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, kind),
                                     x509.NameAttribute(NameOID.COMMON_NAME, f"{kind}:{peer_id}")]))
            .issuer_name(ca_cert.subject).public_key(csr.public_key()).serial_number(x509.random_serial_number())
            # back-dated a little for clocks that lag (a tenth of a short lifetime at most: renew_due
            # counts the lifetime from not_before)
            .not_valid_before(now - dt.timedelta(seconds=min(60, lifetime_seconds // 10))).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return pem.decode(), fingerprint(pem), not_after


def peer_of(cert_der: bytes) -> tuple[str, str]:
    """``(kind, id)`` from a client certificate (DER, as the TLS layer hands it over)."""
    cert = x509.load_der_x509_certificate(cert_der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    m = _CN.fullmatch(str(cns[0].value)) if cns else None
    if not m:
        raise ValueError("not a labd peer certificate")
    return m.group(1), m.group(2)


def validity(cert_der: bytes) -> tuple[dt.datetime, dt.datetime]:
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def der_fingerprint(cert_der: bytes) -> str:
    return "sha256:" + x509.load_der_x509_certificate(cert_der).fingerprint(hashes.SHA256()).hex()


def record(cur, fp: str, kind: str, peer_id: str, not_after: dt.datetime) -> None:
    cur.execute("INSERT INTO certificates (fingerprint, peer_kind, peer_id, not_after) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (fingerprint) DO NOTHING", (fp, kind, peer_id, not_after))


def revoke_peer(cur, kind: str, peer_id: str) -> int:
    """Revoke every certificate of a peer (a re-enrollment or a deletion); returns how many."""
    return cur.execute("UPDATE certificates SET revoked_at = now() WHERE peer_kind = %s AND peer_id = %s "
                       "AND revoked_at IS NULL", (kind, peer_id)).rowcount
