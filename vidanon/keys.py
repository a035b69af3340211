"""Keys: 128-bit secrets, per-track derivation, public key IDs, keyrings and flip vectors.

The reference method keys its sign flip with a 64-bit ``torch.manual_seed``: small enough to
brute-force and tied to torch's generator, which may change between releases.  Here a job gets
a random 128-bit master key; each track key is derived from it with HKDF-SHA256, so handing
one track key to an investigator reveals nothing about the other tracks or the master.  The
±1 vector comes from a ChaCha20 keystream, identical on every platform and library version.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vidanon.errors import KeyMaterialError

KEY_BYTES = 16
KEYRING_FORMAT = "vidanon-keyring"
TRACKKEY_FORMAT = "vidanon-track-key"


def _hkdf(secret: bytes, info: str, length: int = KEY_BYTES, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info.encode()).derive(
        secret
    )


class Key:
    """A secret key that will not show itself in logs, reprs or exception messages."""

    __slots__ = ("_b",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise KeyMaterialError(f"a key must be {KEY_BYTES * 8} bits")
        self._b = bytes(raw)

    @classmethod
    def generate(cls) -> Key:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_hex(cls, text: str) -> Key:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError:
            raise KeyMaterialError("key is not valid hex") from None

    def reveal(self) -> bytes:
        """The raw bytes; call sites that need them are few and easy to audit."""
        return self._b

    def hex(self) -> str:
        return self._b.hex()

    @property
    def id(self) -> str:
        """Public fingerprint: HMAC of a constant, so the key cannot be computed from it."""
        return hmac.new(self._b, b"vidanon/key-id/v1", hashlib.sha256).hexdigest()[:24]

    def __repr__(self) -> str:
        return f"Key(id={self.id})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self._b, other._b)

    def __hash__(self) -> int:
        return hash(self.id)

    def derive(self, purpose: str, length: int = KEY_BYTES) -> bytes:
        return _hkdf(self._b, f"vidanon/{purpose}/v1", length)


def track_key(master: Key, job_id: str, track_id: int) -> Key:
    """Per-track key: HKDF(master, salt=job id, info=track id); one-way and independent."""
    return Key(_hkdf(master.reveal(), f"vidanon/track/{int(track_id)}/v1", salt=job_id.encode()))


def new_job_id() -> str:
    return secrets.token_hex(8)


def flip_signs(key: Key, shape: tuple[int, ...]) -> np.ndarray:
    """The track's ±1 (Rademacher) vector for a latent of ``shape``, as float32.

    Bits come from a ChaCha20 keystream under a key derived from the track key, with the
    shape in the nonce, so vectors for different latent shapes are unrelated.
    """
    n = int(np.prod(shape))
    nonce = hashlib.sha256(("flip:" + "x".join(map(str, shape))).encode()).digest()[:16]
    enc = Cipher(algorithms.ChaCha20(key.derive("flip", 32), nonce), mode=None).encryptor()
    stream = enc.update(b"\x00" * ((n + 7) // 8))
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[:n]
    return (bits.astype(np.float32) * 2.0 - 1.0).reshape(shape)


def mac(key: Key, payload: bytes) -> str:
    """Tag for a sidecar body under a key derived for that purpose only."""
    return hmac.new(key.derive("sidecar-mac", 32), payload, hashlib.sha256).hexdigest()


def mac_ok(key: Key, payload: bytes, tag: str) -> bool:
    return hmac.compare_digest(mac(key, payload), tag)


# --- files -------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the first byte (no window where others can read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _seal(payload: bytes, passphrase: str) -> dict:
    salt = secrets.token_bytes(16)
    kek = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase.encode())
    nonce = secrets.token_bytes(12)
    ct = AESGCM(kek).encrypt(nonce, payload, b"vidanon-keyring-v1")
    b64 = base64.b64encode
    return {
        "kdf": {"name": "scrypt", "n": 2**15, "r": 8, "p": 1, "salt": b64(salt).decode()},
        "cipher": "AES-256-GCM",
        "nonce": b64(nonce).decode(),
        "ciphertext": b64(ct).decode(),
    }


def _unseal(doc: dict, passphrase: str | None) -> bytes:
    if passphrase is None:
        raise KeyMaterialError("keyring is encrypted: set VIDANON_PASSPHRASE or pass --passphrase")
    d = base64.b64decode
    k = doc["kdf"]
    kek = Scrypt(salt=d(k["salt"]), length=32, n=k["n"], r=k["r"], p=k["p"]).derive(
        passphrase.encode()
    )
    try:
        return AESGCM(kek).decrypt(d(doc["nonce"]), d(doc["ciphertext"]), b"vidanon-keyring-v1")
    except InvalidTag:
        raise KeyMaterialError("wrong passphrase, or the keyring file was altered") from None


@dataclass
class Keyring:
    """Master keys by job id. Kept apart from outputs, because output folders get published."""

    path: Path
    jobs: dict[str, dict]
    passphrase: str | None = None

    @classmethod
    def open(cls, path: Path, passphrase: str | None = None, create: bool = False) -> Keyring:
        path = Path(path).expanduser()
        if not path.exists():
            if create:
                return cls(path, {}, passphrase)
            raise KeyMaterialError(f"keyring {path} does not exist")
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            raise KeyMaterialError(f"keyring {path} is not a readable vidanon keyring") from None
        if doc.get("format") != KEYRING_FORMAT:
            raise KeyMaterialError(f"{path} is not a vidanon keyring")
        body = json.loads(_unseal(doc["sealed"], passphrase)) if "sealed" in doc else doc
        return cls(path, dict(body.get("jobs", {})), passphrase)

    def add_job(self, job_id: str, master: Key, note: dict | None = None) -> None:
        self.jobs[job_id] = {"master": master.hex(), "master_id": master.id, **(note or {})}

    def master(self, job_id: str) -> Key:
        if job_id not in self.jobs:
            raise KeyMaterialError(f"keyring {self.path} has no key for job {job_id}")
        return Key.from_hex(self.jobs[job_id]["master"])

    def save(self) -> None:
        body = {"format": KEYRING_FORMAT, "version": 1, "jobs": self.jobs}
        if self.passphrase:
            raw = json.dumps({"jobs": self.jobs}).encode()
            doc = {"format": KEYRING_FORMAT, "version": 1, "sealed": _seal(raw, self.passphrase)}
        else:
            doc = body
        _write_private(self.path, json.dumps(doc, indent=1).encode())


def export_track_key(
    keyring: Keyring, job_id: str, track_id: int, dest: Path, passphrase: str | None = None
) -> Key:
    """Write one track's key for an authorised party; other tracks stay out of reach."""
    key = track_key(keyring.master(job_id), job_id, track_id)
    doc: dict = {"format": TRACKKEY_FORMAT, "version": 1, "job_id": job_id,
                 "track_id": int(track_id), "key_id": key.id}
    if passphrase:
        doc["sealed"] = _seal(key.hex().encode(), passphrase)
    else:
        doc["key"] = key.hex()
    _write_private(Path(dest), json.dumps(doc, indent=1).encode())
    return key


def read_track_key(path: Path, passphrase: str | None = None) -> tuple[str, int, Key]:
    """Load an exported track key: (job id, track id, key)."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != TRACKKEY_FORMAT:
            raise ValueError
        raw = _unseal(doc["sealed"], passphrase).decode() if "sealed" in doc else doc["key"]
        key = Key.from_hex(raw)
        job, track = str(doc["job_id"]), int(doc["track_id"])
    except KeyMaterialError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        raise KeyMaterialError(f"{path} is not a readable vidanon track key file") from None
    if key.id != doc.get("key_id"):
        raise KeyMaterialError(f"{path}: key does not match its recorded key id (file altered)")
    return job, track, key
