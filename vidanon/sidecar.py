"""The sidecar ``<output>.vidanon.json``: everything recovery needs, and no key.

The reference method re-derives crops and masks from the anonymized image at recovery time;
here the exact transform of every face in every frame, the model and all settings are
stored, so recovery repeats anonymization's geometry bit for bit.  Tags (HMAC) under a key
derived from the master key and under each track key let any key holder check that the
file was not altered.  Schema: docs/sidecar.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from vidanon.errors import SidecarError
from vidanon.keys import Key, mac, mac_ok

FORMAT = "vidanon-sidecar"
VERSION = 1


def sidecar_path(video: Path) -> Path:
    video = Path(video)
    return video.with_name(video.name + ".vidanon.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k != "auth"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(doc: dict, master: Key, track_keys: dict[int, Key]) -> dict:
    payload = canonical(doc)
    doc["auth"] = {
        "alg": "HMAC-SHA256/HKDF",
        "master": mac(master, payload),
        "tracks": {str(t): mac(k, payload) for t, k in sorted(track_keys.items())},
    }
    return doc


def verify(doc: dict, track_id: int | None = None, key: Key | None = None,
           master: Key | None = None) -> None:
    """Raise SidecarError unless the tag for the given key matches the body."""
    auth = doc.get("auth") or {}
    payload = canonical(doc)
    if master is not None and not mac_ok(master, payload, auth.get("master", "")):
        raise SidecarError("sidecar was altered (or belongs to another job): tag mismatch")
    if key is not None:
        tag = (auth.get("tracks") or {}).get(str(track_id), "")
        if not mac_ok(key, payload, tag):
            raise SidecarError(f"sidecar was altered: track {track_id} tag does not match")


def write(path: Path, doc: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # published next to the video; it holds no secrets
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise SidecarError(f"sidecar {path} not found (it is written next to the output video)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SidecarError(f"sidecar {path} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SidecarError(f"{path} is not a vidanon sidecar")
    if doc.get("version") != VERSION:
        raise SidecarError(f"sidecar {path} has version {doc.get('version')}, expected {VERSION}")
    for field in ("job_id", "model", "settings", "tracks", "output", "auth"):
        if field not in doc:
            raise SidecarError(f"sidecar {path} lacks the {field!r} field")
    return doc


def track_entry(doc: dict, track_id: int) -> dict:
    for tr in doc["tracks"]:
        if int(tr["id"]) == int(track_id):
            return tr
    ids = ", ".join(str(t["id"]) for t in doc["tracks"]) or "none"
    raise SidecarError(f"no track {track_id} in this sidecar (tracks: {ids})")
