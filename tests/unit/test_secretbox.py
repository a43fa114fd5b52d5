"""labcore.secretbox: sealed values open only with their key and their aad; the key file is 0600."""

import pytest

from labcore import secretbox


def test_round_trip_and_binding(tmp_path):
    key = secretbox.load_or_create_key(tmp_path / "d" / "secret.key")
    assert (tmp_path / "d" / "secret.key").stat().st_mode & 0o777 == 0o600
    sealed = secretbox.seal(key, b"hunter2", b"bmc:52:54:00:00:00:01")
    assert "hunter2" not in sealed and sealed.startswith("v1:")
    assert secretbox.unseal(key, sealed, b"bmc:52:54:00:00:00:01") == b"hunter2"
    assert secretbox.seal(key, b"hunter2", b"x") != secretbox.seal(key, b"hunter2", b"x")  # fresh nonce
    with pytest.raises(secretbox.SecretError):
        secretbox.unseal(key, sealed, b"bmc:52:54:00:00:00:02")
    other = secretbox.load_or_create_key(tmp_path / "other.key")
    with pytest.raises(secretbox.SecretError):
        secretbox.unseal(other, sealed, b"bmc:52:54:00:00:00:01")
    with pytest.raises(secretbox.SecretError):
        secretbox.unseal(key, sealed[:-4] + "AAAA", b"bmc:52:54:00:00:00:01")
    for junk in ("", "v1:", "v1:!!", "plain"):
        with pytest.raises(secretbox.SecretError):
            secretbox.unseal(key, junk)


def test_key_is_reused_tightened_and_checked(tmp_path):
    path = tmp_path / "secret.key"
    key = secretbox.load_or_create_key(path)
    path.chmod(0o644)
    assert secretbox.load_or_create_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(b"short")
    with pytest.raises(secretbox.SecretError, match="32 bytes"):
        secretbox.load_or_create_key(path)
