"""labcore.enroll: the join token with its CA pin, keys and CSRs, the identity files, renewal timing."""

from __future__ import annotations

import datetime as dt
import random
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from labcore import enroll
from labcore.link import backoff

FP = "sha256:" + "ab" * 32


def test_join_round_trip_and_refusals():
    join = enroll.format_join("labd_bastion_abc-_DEF", FP)
    assert enroll.parse_join(join) == ("labd_bastion_abc-_DEF", FP)
    assert enroll.parse_join(f"  {join}\n") == ("labd_bastion_abc-_DEF", FP)
    for bad in ("", "labd_bastion_x", f"labd_bastion_x:sha256:{'ab' * 31}", f":{FP}", f"a b:{FP}",
                f"x:{FP.upper()}", f"x:{FP}\nINJECT"):
        with pytest.raises(enroll.EnrollError, match="not a join token"):
            enroll.parse_join(bad)
    with pytest.raises(ValueError):
        enroll.format_join("has:colon", FP)
    with pytest.raises(ValueError):
        enroll.format_join("x", "md5:00")


def test_key_and_csr():
    key_pem, csr_pem = enroll.new_key_and_csr("bastion:b1")
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey) and csr.public_key().curve.name == "secp256r1"
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bastion:b1"
    assert b"PRIVATE KEY" in key_pem and b"PRIVATE KEY" not in csr_pem
    assert enroll.new_key_and_csr("x")[0] != key_pem  # a new key every time


def _cert(days_before: float, days_after: float) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=days_before))
            .not_valid_after(now + dt.timedelta(days=days_after)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_fingerprint_matches_cryptography():
    pem = _cert(1, 1)
    assert enroll.fingerprint(pem) == "sha256:" + x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
    assert enroll.FINGERPRINT_RE.fullmatch(enroll.fingerprint(pem.decode()))


def test_store_identity_modes(tmp_path):
    d = tmp_path / "identity"
    key, _ = enroll.new_key_and_csr("a")
    enroll.store_identity(d, key, _cert(0, 1), _cert(0, 10), meta={"id": "x", "hub": "wss://h:1"})
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in (enroll.KEY_FILE, enroll.CERT_FILE, enroll.CA_FILE, enroll.META_FILE):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert enroll.has_identity(d) and enroll.load_meta(d)["hub"] == "wss://h:1"
    assert not list(d.glob("*.tmp"))


def test_renew_due_at_two_thirds():
    rng = random.Random(1)
    assert not enroll.renew_due(_cert(1, 29), rng=rng)  # 1/30 of its life
    assert not enroll.renew_due(_cert(15, 15), rng=rng)  # half
    assert enroll.renew_due(_cert(21, 9), rng=rng)  # 70 %
    assert enroll.renew_due(_cert(31, -1), rng=rng)  # expired: certainly due
    # the jitter moves the moment at most 5 % of the lifetime earlier
    pem = _cert(0, 30)
    s, e = enroll.cert_times(pem)
    life = e - s
    assert not any(enroll.renew_due(pem, s + life * 0.6, rng=random.Random(i)) for i in range(50))
    assert all(enroll.renew_due(pem, s + life * 0.67, rng=random.Random(i)) for i in range(50))


def test_backoff_grows_is_capped_and_jittered():
    rng = random.Random(7)
    firsts = [backoff(1, rng=rng) for _ in range(100)]
    assert all(0.25 <= x <= 0.5 for x in firsts) and len(set(firsts)) > 90
    assert all(15 <= backoff(30, rng=rng) <= 30 for _ in range(100))
    assert backoff(4, base=1, cap=100, rng=random.Random(0)) <= 8
