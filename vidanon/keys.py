"""Keys: 128-bit secrets, per-track derivation, public key IDs, keyrings, flip vectors, and
track keys sealed for the workers of a Ray run.

The reference method keys its sign flip with a 64-bit ``torch.manual_seed``: small enough to
brute-force and tied to torch's generator, which may change between releases.  Here a job gets
a random 128-bit master key; each track key is derived from it with HKDF-SHA256, so handing
one track key to an investigator reveals nothing about the other tracks or the master.  The
±1 vector comes from a ChaCha20 keystream, identical on every platform and library version.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
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


def track_key(master: Key, job_id: str, track_id: int, epoch: int = 0) -> Key:
    """Per-track key: HKDF(master, salt=job id, info=track id); one-way and independent.

    ``epoch`` > 0 gives the track a fresh key (the privacy guard's second escalation) that
    is still derived from the master, so recovery needs nothing new from the keyring.
    """
    info = f"vidanon/track/{int(track_id)}/v1" + (f"/e{int(epoch)}" if epoch else "")
    return Key(_hkdf(master.reveal(), info, salt=job_id.encode()))


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


def anchor_noise(key: Key, shape: tuple[int, ...]) -> np.ndarray:
    """The track's pseudo-identity: standard normal noise of ``shape`` (float32) from the key.

    Box-Muller over a ChaCha20 keystream (not numpy's or torch's generators, whose streams
    may change between releases: recovery years later must draw the very same noise).
    """
    n = int(np.prod(shape))
    half = (n + 1) // 2
    nonce = hashlib.sha256(("anchor:" + "x".join(map(str, shape))).encode()).digest()[:16]
    enc = Cipher(algorithms.ChaCha20(key.derive("anchor", 32), nonce), mode=None).encryptor()
    words = np.frombuffer(enc.update(b"\x00" * (8 * half)), dtype="<u4").astype(np.float64)
    u = (words + 0.5) / 2.0**32  # in (0, 1): log never sees 0
    r, theta = np.sqrt(-2.0 * np.log(u[:half])), 2.0 * np.pi * u[half:]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
    return z.astype(np.float32).reshape(shape)


def mac(key: Key, payload: bytes) -> str:
    """Tag for a sidecar body under a key derived for that purpose only."""
    return hmac.new(key.derive("sidecar-mac", 32), payload, hashlib.sha256).hexdigest()


def mac_ok(key: Key, payload: bytes, tag: str) -> bool:
    return hmac.compare_digest(mac(key, payload), tag)


# --- files -------------------------------------------------------------------------------

SCRYPT_N = 2**15  # scrypt cost for new sealed files; the cost used is stored in each file


def _write_private(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write atomically with mode 0600 from the first byte (no window where others can read).

    With ``overwrite=False`` the final step is a hard link, which fails if ``path`` exists, so
    two writers cannot both believe they created it.  OS errors become one-line
    ``KeyMaterialError``s naming the file: an unwritable keyring folder is a setup problem.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as exc:
        raise KeyMaterialError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyMaterialError(
                    f"{path} already exists; pass --force to replace it") from None
            Path(tmp).unlink()
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise KeyMaterialError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _KekCache:
    """Derived key-encryption keys by (passphrase, salt, cost): scrypt is slow on purpose, and
    a keyring re-read under its lock before each write should not pay for it twice."""

    def __init__(self) -> None:
        self._d: dict[tuple, bytes] = {}

    def get(self, passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        k = (hashlib.sha256(passphrase.encode()).digest(), salt, n, r, p)
        if k not in self._d:
            self._d[k] = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())
        return self._d[k]

    def __repr__(self) -> str:
        return "_KekCache(...)"


def _seal(payload: bytes, passphrase: str, kdf: dict | None = None,
          cache: _KekCache | None = None) -> dict:
    """AES-256-GCM under an scrypt key; ``kdf`` reuses a file's salt and cost (fresh nonce)."""
    b64 = base64.b64encode
    if kdf is None:
        kdf = {"name": "scrypt", "n": SCRYPT_N, "r": 8, "p": 1,
               "salt": b64(secrets.token_bytes(16)).decode()}
    salt = base64.b64decode(kdf["salt"])
    kek = (cache or _KekCache()).get(passphrase, salt, kdf["n"], kdf["r"], kdf["p"])
    nonce = secrets.token_bytes(12)
    ct = AESGCM(kek).encrypt(nonce, payload, b"vidanon-keyring-v1")
    return {
        "kdf": dict(kdf),
        "cipher": "AES-256-GCM",
        "nonce": b64(nonce).decode(),
        "ciphertext": b64(ct).decode(),
    }


def _unseal(doc: dict, passphrase: str | None, what: str = "keyring",
            hint: str = "set VIDANON_PASSPHRASE or pass --passphrase",
            cache: _KekCache | None = None) -> bytes:
    if passphrase is None:
        raise KeyMaterialError(f"{what} is encrypted: {hint}")
    d = base64.b64decode
    k = doc["kdf"]
    kek = (cache or _KekCache()).get(passphrase, d(k["salt"]), k["n"], k["r"], k["p"])
    try:
        return AESGCM(kek).decrypt(d(doc["nonce"]), d(doc["ciphertext"]), b"vidanon-keyring-v1")
    except InvalidTag:
        raise KeyMaterialError(f"wrong passphrase, or the {what} file was altered") from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _resumable(entry: dict) -> bool:
    folder = entry.get("resume")
    return bool(folder) and Path(str(folder)).is_dir()


PENDING = "pending"
COMPLETE = "complete"


class Keyring:
    """Master keys by job id. Kept apart from outputs, because output folders get published.

    Several runs may share one keyring, so every write is a read-modify-write under an
    exclusive lock (``<target>.lock``): the file is re-read under the lock and only this
    object's own changes (jobs added, updated or removed through it) are applied to it, so
    nobody's jobs are lost to a stale copy.  A symlinked keyring is written through to its
    target.  Jobs carry a status: ``pending`` while a run may still publish its output
    (keys are written before rendering, so an output is never unrecoverable), ``complete``
    once its sidecar is in place; entries without a status come from older versions and
    count as complete.
    """

    def __init__(self, path: Path, jobs: dict[str, dict] | None = None,
                 passphrase: str | None = None, kdf_n: int = SCRYPT_N) -> None:
        self.path = Path(path).expanduser()
        self.jobs: dict[str, dict] = dict(jobs or {})
        self._passphrase = passphrase
        self._kdf_n = int(kdf_n)
        self._kdf: dict | None = None  # salt and cost of the file as last read
        self._keks = _KekCache()
        self._changes: dict[str, dict | None] = {}  # job id -> new entry, None = removed
        self._prune: Callable[[str, dict], bool] | None = None

    @property
    def passphrase(self) -> str | None:
        return self._passphrase

    @property
    def encrypted(self) -> bool:
        return bool(self._passphrase)

    def __repr__(self) -> str:
        # Never the jobs themselves: they hold master keys.
        return (f"Keyring(path={str(self.path)!r}, jobs={len(self.jobs)}, "
                f"encrypted={self.encrypted})")

    __str__ = __repr__

    @property
    def target(self) -> Path:
        """The file actually written: a symlinked keyring's target, so vaults stay in sync."""
        return self.path.resolve()

    @classmethod
    def open(cls, path: Path, passphrase: str | None = None, create: bool = False,
             kdf_n: int = SCRYPT_N) -> Keyring:
        """Read a keyring (no lock needed: writers replace the file atomically).

        ``kdf_n`` is the scrypt cost for a keyring this call creates; an existing file keeps
        its own.  Lowering it is for tests only.
        """
        ring = cls(path, {}, passphrase, kdf_n)
        if not ring.target.exists():
            if create:
                return ring
            raise KeyMaterialError(f"keyring {ring.path} does not exist")
        ring.jobs = ring._read()
        return ring

    def _read(self) -> dict[str, dict]:
        target = self.target
        if not target.exists():
            self._kdf = None
            return {}
        try:
            doc = json.loads(target.read_text())
        except (OSError, ValueError):
            raise KeyMaterialError(
                f"keyring {self.path} is not a readable vidanon keyring") from None
        if not isinstance(doc, dict) or doc.get("format") != KEYRING_FORMAT:
            raise KeyMaterialError(f"{self.path} is not a vidanon keyring")
        if "sealed" in doc:
            body = json.loads(_unseal(doc["sealed"], self._passphrase, cache=self._keks))
            self._kdf = dict(doc["sealed"]["kdf"])
        else:
            body, self._kdf = doc, None
        return dict(body.get("jobs", {}))

    # -- changes (kept in memory until save) ---------------------------------------------

    def add_job(self, job_id: str, master: Key, note: dict | None = None,
                status: str = COMPLETE) -> None:
        entry = {"master": master.hex(), "master_id": master.id, **(note or {}),
                 "status": status}
        self.jobs[job_id] = entry
        self._changes[job_id] = entry

    def update_job(self, job_id: str, **fields: object) -> None:
        entry = {**self.jobs[job_id], **fields}
        self.jobs[job_id] = entry
        self._changes[job_id] = entry

    def remove_job(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._changes[job_id] = None

    def master(self, job_id: str) -> Key:
        if job_id not in self.jobs:
            raise KeyMaterialError(f"keyring {self.path} has no key for job {job_id}")
        return Key.from_hex(self.jobs[job_id]["master"])

    def status(self, job_id: str) -> str:
        return str(self.jobs.get(job_id, {}).get("status", COMPLETE))

    def complete_jobs(self) -> list[str]:
        return [j for j in self.jobs if self.status(j) == COMPLETE]

    def prune_dead_pending(self, still_published: Callable[[str, dict], bool]) -> None:
        """Drop pending jobs of runs on this host that died (killed) before publishing,
        except those whose run left finished work to continue (``resume``: a work folder that
        still exists; a Ray run's segments, see ``vidanon.scale``).

        ``still_published(job_id, entry)`` says whether the job's output and sidecar made it
        out after all (killed between publishing and marking complete): such jobs are marked
        complete instead.  Evaluated at save time, on the freshly read file.
        """
        self._prune = still_published

    def _apply(self, jobs: dict[str, dict]) -> dict[str, dict]:
        for job_id, entry in self._changes.items():
            if entry is None:
                jobs.pop(job_id, None)
            else:
                jobs[job_id] = entry
        if self._prune is not None:
            host = socket.gethostname()
            for job_id, e in list(jobs.items()):
                if (e.get("status") == PENDING and e.get("host") == host
                        and job_id not in self._changes
                        and not pid_alive(int(e.get("pid", 0) or 0))
                        and not _resumable(e)):
                    if self._prune(job_id, e):
                        jobs[job_id] = {**e, "status": COMPLETE}
                    else:
                        jobs.pop(job_id)
        return jobs

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock on ``<target>.lock`` (kept, never deleted: deleting a lock file
        while another process waits on it would let two writers in)."""
        target = self.target
        lock_path = target.with_name(target.name + ".lock")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyMaterialError(
                f"cannot write keyring {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def save(self) -> None:
        """Merge this object's changes into the file as it is now, under the lock."""
        with self._locked():
            jobs = self._apply(self._read())
            if self._passphrase:
                raw = json.dumps({"jobs": jobs}).encode()
                kdf = self._kdf or {"name": "scrypt", "n": self._kdf_n, "r": 8, "p": 1,
                                    "salt": base64.b64encode(secrets.token_bytes(16)).decode()}
                doc = {"format": KEYRING_FORMAT, "version": 1,
                       "sealed": _seal(raw, self._passphrase, kdf, self._keks)}
                self._kdf = kdf
            else:
                doc = {"format": KEYRING_FORMAT, "version": 1, "jobs": jobs}
            _write_private(self.target, json.dumps(doc, indent=1).encode())
            self.jobs = jobs
            self._changes = {}
            self._prune = None


def export_track_key(
    keyring: Keyring, job_id: str, track_id: int, dest: Path, passphrase: str | None = None,
    overwrite: bool = False, allow_pending: bool = False, check_track: bool = True,
) -> Key:
    """Write one track's key for an authorised party; other tracks stay out of reach.

    ``passphrase`` seals the exported file with its own passphrase, chosen at export (never
    the keyring's: the investigator must not need the owner's).  A pending job (its run may
    have died before publishing) and a track the job does not have are refused, unless the
    caller checked a sidecar that lists them (``allow_pending``, ``check_track=False``).
    """
    if job_id not in keyring.jobs:
        raise KeyMaterialError(f"keyring {keyring.path} has no key for job {job_id}")
    if keyring.status(job_id) != COMPLETE and not allow_pending:
        raise KeyMaterialError(f"job {job_id} is incomplete (its run did not finish); "
                               "pass --sidecar of its output if that was published")
    key_tracks = keyring.jobs[job_id].get("key_tracks")
    if check_track and key_tracks is not None:
        if str(int(track_id)) not in key_tracks:
            ids = ", ".join(key_tracks) or "none"
            raise KeyMaterialError(f"job {job_id} has no track {track_id} (tracks: {ids})")
        track_id = int(key_tracks[str(int(track_id))])  # a linked track uses its group's key
    key = track_key(keyring.master(job_id), job_id, track_id)
    doc: dict = {"format": TRACKKEY_FORMAT, "version": 1, "job_id": job_id,
                 "track_id": int(track_id), "key_id": key.id}
    if passphrase:
        doc["sealed"] = _seal(key.hex().encode(), passphrase)
    else:
        doc["key"] = key.hex()
    _write_private(Path(dest), json.dumps(doc, indent=1).encode(), overwrite=overwrite)
    return key


def read_track_key(path: Path, passphrase: str | None = None) -> tuple[str, int, Key]:
    """Load an exported track key: (job id, track id, key)."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != TRACKKEY_FORMAT:
            raise ValueError
        raw = (_unseal(doc["sealed"], passphrase, "key file",
                       "set VIDANON_KEY_PASSPHRASE or pass --key-passphrase").decode()
               if "sealed" in doc else doc["key"])
        key = Key.from_hex(raw)
        job, track = str(doc["job_id"]), int(doc["track_id"])
    except KeyMaterialError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        raise KeyMaterialError(f"{path} is not a readable vidanon track key file") from None
    if key.id != doc.get("key_id"):
        raise KeyMaterialError(f"{path}: key does not match its recorded key id (file altered)")
    return job, track, key


# --- sealed transport of track keys to workers ----------------------------------------------
#
# A Ray cluster records what passes through it: task arguments go to the object store and
# may be spilled to disk, actor constructor arguments to the GCS, exceptions and prints to log
# files.  So no channel Ray offers is private, and a session key handed to a worker through
# one would be recorded next to everything it protects.  Instead each worker makes an X25519
# key pair when it starts and publishes only the public half; the driver makes one per run.
# Both sides derive the same AES-256-GCM key (ECDH + HKDF) without it ever being sent, and a
# unit's track keys travel sealed under it, bound to that unit.  What Ray records (public
# keys, nonces, ciphertexts) reveals nothing without a private key, and those never leave the
# process that made them (they refuse to be pickled).  This protects against logs, dashboards
# and object spilling, not against someone who controls the cluster's code (see docs/scale.md).

_SEAL_INFO = b"vidanon/unit-keys/v1"


class StaleSession(Exception):
    """Sealed for another instance of the worker (it was restarted): seal again, resubmit."""


def _session_key(private: X25519PrivateKey, peer: bytes, driver: bytes, worker: bytes) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=driver + worker,
                info=_SEAL_INFO).derive(shared)


class _NoPickle:
    def __reduce__(self):  # noqa: ANN204
        raise TypeError(f"{type(self).__name__} holds a private key and must not be pickled")


class _Party(_NoPickle):
    """One end of the driver-worker channel: an X25519 key pair whose private half never
    leaves this process, and the session keys agreed with the other ends so far."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()
        self._keys: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(...)"


class KeySealer(_Party):
    """Driver side: seals a unit's track keys for one worker."""

    def seal(self, worker: bytes, keys: dict[int, Key], aad: bytes) -> bytes:
        """``driver public | worker public | nonce | AES-GCM(track id, key ...)``."""
        if worker not in self._keys:
            self._keys[worker] = _session_key(self._private, worker, self.public, worker)
        body = b"".join(int(t).to_bytes(8, "big", signed=True) + k.reveal()
                        for t, k in sorted(keys.items()))
        nonce = secrets.token_bytes(12)
        return self.public + worker + nonce + AESGCM(self._keys[worker]).encrypt(nonce, body, aad)


class KeyOpener(_Party):
    """Worker side: the private half stays in this process; ``public`` goes to the driver."""

    def open(self, sealed: bytes, aad: bytes) -> dict[int, Key]:
        driver, worker, nonce, ct = sealed[:32], sealed[32:64], sealed[64:76], sealed[76:]
        if worker != self.public:
            raise StaleSession("unit keys were sealed for an earlier instance of this worker")
        if driver not in self._keys:
            self._keys[driver] = _session_key(self._private, driver, driver, self.public)
        try:
            body = AESGCM(self._keys[driver]).decrypt(nonce, ct, aad)
        except InvalidTag:
            raise KeyMaterialError("sealed unit keys do not open (altered, or another unit's)"
                                   ) from None
        step = 8 + KEY_BYTES
        return {int.from_bytes(body[i:i + 8], "big", signed=True): Key(body[i + 8:i + step])
                for i in range(0, len(body), step)}
