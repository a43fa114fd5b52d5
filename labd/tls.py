"""labd's own certificates: an EC P-256 CA made once by `labd init`, and a server certificate it
signs (SANs: this host's name, localhost, 127.0.0.1, ::1 and any --san). Clients pin the CA on
first login by its SHA-256 fingerprint (labctl login prints it, like SSH)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from labcore import private


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def make_ca(data_dir: Path) -> tuple[Path, Path]:
    """The CA key (0600) and certificate (10 years) in the data directory; kept if present."""
    key_path, cert_path = data_dir / "ca.key", data_dir / "ca.crt"
    if key_path.exists() and cert_path.exists():
        return key_path, cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"labd CA {socket.gethostname()}"[:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    private.write(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_server_cert(data_dir: Path, sans: list[str] = (), days: int = 825) -> tuple[Path, Path]:
    """server.key (0600) + server.crt signed by labd's CA, for this host's names and addresses."""
    ca_key = serialization.load_pem_private_key((data_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((data_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    names = [socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1", *sans]
    general: list[x509.GeneralName] = []
    for n in dict.fromkeys(n for n in names if n):
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            general.append(x509.DNSName(n))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname()[:64] or "labd")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(general), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_path, cert_path = data_dir / "server.key", data_dir / "server.crt"
    private.write(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + (data_dir / "ca.crt").read_bytes())
    return key_path, cert_path
