"""Keys: derivation vectors, independence, flip vectors, keyring files, secrecy."""

import hashlib
import hmac
import json
import os
import stat

import numpy as np
import pytest

from vidanon.errors import KeyMaterialError
from vidanon.keys import (
    Key,
    Keyring,
    anchor_noise,
    export_track_key,
    flip_signs,
    read_track_key,
    track_key,
)

MASTER = Key(bytes(range(16)))
JOB = "00112233aabbccdd"


def _rfc5869(ikm: bytes, salt: bytes, info: bytes, n: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:n]


def test_track_key_pinned_vector_and_is_plain_hkdf():
    k1 = track_key(MASTER, JOB, 1)
    assert k1.hex() == "417be374bbab870594361188ecddba69"
    assert k1.id == "59048fab2d54d81526776b17"
    assert MASTER.id == "7299cc368884fe1050f75308"
    expected = _rfc5869(bytes(range(16)), JOB.encode(), b"vidanon/track/1/v1", 16)
    assert k1.reveal() == expected


def test_track_keys_differ_per_track_and_job():
    keys = {track_key(MASTER, JOB, t).hex() for t in range(1, 50)}
    assert len(keys) == 49
    assert track_key(MASTER, "other", 1) != track_key(MASTER, JOB, 1)


def test_key_id_does_not_contain_key_and_key_hidden_in_repr():
    k = Key.generate()
    assert k.hex() not in k.id and k.id not in k.hex()
    assert k.hex() not in repr(k) and k.hex() not in str(k) and k.hex() not in f"{k}"
    assert len(k.reveal()) == 16  # 128-bit
    with pytest.raises(KeyMaterialError):
        Key(b"\x00" * 8)


def test_flip_vector_balanced_stable_and_avalanche():
    shape = (3, 64, 64)
    k = track_key(MASTER, JOB, 1)
    s = flip_signs(k, shape)
    assert s.shape == shape and s.dtype == np.float32
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert abs(s.mean()) < 0.03  # 12288 fair coins: sd of the mean ~0.009
    assert np.array_equal(s, flip_signs(Key(k.reveal()), shape))
    assert flip_signs(k, (3, 4, 4)).ravel()[:16].astype(int).tolist() == [
        1, -1, 1, -1, 1, -1, 1, -1, 1, 1, -1, 1, 1, -1, 1, 1]
    raw = bytearray(k.reveal())
    raw[5] ^= 0x10  # one bit off
    s2 = flip_signs(Key(bytes(raw)), shape)
    frac = float((s != s2).mean())
    assert 0.45 < frac < 0.55


def test_anchor_noise_is_standard_normal_stable_and_keyed():
    shape = (32, 16, 16)
    k = track_key(MASTER, JOB, 1)
    n = anchor_noise(k, shape)
    assert n.shape == shape and n.dtype == np.float32
    assert abs(n.mean()) < 0.05 and abs(n.std() - 1) < 0.05  # 8192 draws
    assert abs(float(np.mean(np.abs(n) > 1.96)) - 0.05) < 0.015  # normal tails, not uniform
    # Pinned values: recovery years later must draw the same noise on any platform.
    assert np.allclose(anchor_noise(k, (3, 2, 2)).ravel()[:6],
                       [-1.7969, 0.4392, 0.1029, 0.3597, -0.4056, 0.4816], atol=1e-4)
    other = anchor_noise(track_key(MASTER, JOB, 2), shape)
    assert abs(np.corrcoef(n.ravel(), other.ravel())[0, 1]) < 0.05  # another track: unrelated
    flips = flip_signs(k, shape)  # the flip and the anchor of one key are unrelated too
    assert abs(np.corrcoef(n.ravel(), flips.ravel())[0, 1]) < 0.05


def test_keyring_mode_roundtrip_and_encryption(tmp_path):
    path = tmp_path / "ring.json"
    ring = Keyring.open(path, create=True)
    ring.add_job(JOB, MASTER)
    ring.save()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Keyring.open(path).master(JOB) == MASTER

    sealed = tmp_path / "sealed.json"
    ring2 = Keyring.open(sealed, passphrase="correct horse", create=True)
    ring2.add_job(JOB, MASTER)
    ring2.save()
    text = sealed.read_text()
    assert MASTER.hex() not in text
    assert Keyring.open(sealed, passphrase="correct horse").master(JOB) == MASTER
    with pytest.raises(KeyMaterialError, match="passphrase"):
        Keyring.open(sealed, passphrase="wrong")
    with pytest.raises(KeyMaterialError, match="encrypted"):
        Keyring.open(sealed)


def test_export_one_track_key(tmp_path):
    ring = Keyring.open(tmp_path / "r.json", create=True)
    ring.add_job(JOB, MASTER)
    out = tmp_path / "t3.key"
    k = export_track_key(ring, JOB, 3, out)
    doc = json.loads(out.read_text())
    assert MASTER.hex() not in out.read_text()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    job, track, key = read_track_key(out)
    assert (job, track, key) == (JOB, 3, k) and key == track_key(MASTER, JOB, 3)
    doc["key"] = "00" * 16
    out.write_text(json.dumps(doc))
    with pytest.raises(KeyMaterialError, match="altered"):
        read_track_key(out)
