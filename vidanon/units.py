"""Work units of a scaled-out run, and the manifests that make it resumable (no Ray here).

A unit is one frame span of one rendering pass of one video.  Spans start and end where the
single-machine renderer holds no frame back (``render.batch_boundaries``), so every crop is
transformed in the same engine batch as in a single-machine run and the joined segments
decode to the same pixels.  Units carry no key: the track keys of a unit travel sealed
beside it (``keys.KeySealer``).

Two manifests, both written by the driver only, atomically (temp file, rename):

* ``<output>.vidanon-work/manifest.json``: the first-pass units of one video that are
  finished (segment file, its size, what the privacy guard saw).  A unit is reused only if
  its digest (input, model, settings, span, faces, key ids) matches, so a changed plan
  re-renders exactly the units it touches.  Escalation passes of the guard are not recorded:
  they are rare and short, and redone.
* ``<out_dir>/vidanon-manifest.json``: the files a folder run finished, so a re-run over a
  large archive skips them from a stat and a small read instead of hashing every input.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vidanon import sidecar
from vidanon.guard import TrackCheck
from vidanon.keys import Key
from vidanon.media import VideoInfo
from vidanon.passes import Span
from vidanon.render import FaceJob

WORK_SUFFIX = ".vidanon-work"
WORK_FORMAT = "vidanon-work"
FILES_NAME = "vidanon-manifest.json"
FILES_FORMAT = "vidanon-manifest"


def choose_spans(bounds: list[int], frames: int, target: int) -> list[tuple[int, int]]:
    """Cut ``[0, frames)`` at some of ``bounds`` into spans of about ``target`` frames.

    A cut is made at the first boundary at least ``target`` frames after the last one, unless
    that would leave a tail shorter than half a span (it joins the last span instead).
    """
    spans = []
    start = 0
    for b in bounds:
        if b - start >= target and frames - b >= max(1, target // 2):
            spans.append((start, b))
            start = b
    spans.append((start, frames))
    return spans


@dataclass(frozen=True)
class Unit:
    """Everything a worker needs to render one span, except the keys (sealed separately)."""

    job_id: str
    pass_no: int
    index: int
    src: Path
    base: Path | None
    part: Path
    info: VideoInfo
    settings: dict
    span: Span
    plan: dict[int, list[FaceJob]]
    grow: dict[int, float]
    tracks: tuple[int, ...]
    verify: bool
    threshold: float | None  # None: by face size (vidanon.guard.threshold_at)
    digest: str
    # The unit's face regions, sealed under each track's key (vidanon.masks): opened on the
    # worker with the keys sealed to it; ciphertext only in Ray's object store.
    masks: dict[int, dict] = field(default_factory=dict)

    @property
    def aad(self) -> bytes:
        """Binds sealed keys to this unit: keys sealed for one unit do not open for another."""
        return f"{self.job_id}/{self.pass_no}/{self.index}/{self.digest}".encode()

    @property
    def frames(self) -> int:
        return self.span.stop - self.span.start

    @property
    def crops(self) -> int:
        return sum(j.mode == "diffusion" for jobs in self.plan.values() for j in jobs)


@dataclass
class UnitResult:
    index: int
    part: Path
    size: int
    frames: int
    crops: int
    checks: dict[int, TrackCheck] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""

    def as_dict(self) -> dict:
        return {"index": self.index, "part": self.part.name, "size": self.size,
                "frames": self.frames, "crops": self.crops, "seconds": round(self.seconds, 3),
                "checks": {str(t): [c.frames, c.max_similarity, c.worst_frame, c.threshold,
                                    [list(w) for w in c.worst]]
                           for t, c in self.checks.items()}}

    @classmethod
    def from_dict(cls, d: dict, folder: Path) -> UnitResult:
        return cls(int(d["index"]), folder / d["part"], int(d["size"]), int(d["frames"]),
                   int(d["crops"]),
                   {int(t): TrackCheck(int(v[0]), float(v[1]), int(v[2]), float(v[3]),
                                       [(float(m), int(f)) for m, f in v[4]])
                    for t, v in d["checks"].items()}, float(d.get("seconds", 0.0)))


def unit_digest(input_sha: str, weights_sha: str, settings: dict, span: Span,
                plan: dict[int, list[FaceJob]], grow: dict[int, float],
                keys: dict[int, Key]) -> str:
    """What a unit's pixels depend on; key ids (public fingerprints), never keys."""
    body = {
        "v": 1, "input": input_sha, "model": weights_sha, "settings": settings,
        "span": [span.start, span.stop, span.offset],
        "grow": {str(t): g for t, g in sorted(grow.items())},
        "faces": [[f, j.track_id, j.mode, [float(v) for v in j.matrix.ravel()]]
                  for f in sorted(plan) for j in plan[f]],
        "keys": {str(t): keys[t].id for t in sorted(keys)},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class WorkDir:
    """``<output>.vidanon-work/``: one video's segment files and its unit manifest."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output).with_name(Path(output).name + WORK_SUFFIX)
        self.manifest = self.path / "manifest.json"
        self._doc: dict | None = None

    def load(self) -> dict | None:
        """The manifest left by an earlier run, or None if there is none that reads."""
        try:
            doc = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") != WORK_FORMAT:
            return None
        if not isinstance(doc.get("units"), dict):
            return None
        self._doc = doc
        return doc

    def start(self, job_id: str, input_sha: str, keep: bool) -> None:
        """Begin (``keep``: continue) the job's manifest; a fresh start drops old segments."""
        if not keep:
            self.remove()
            self._doc = None
        self.path.mkdir(parents=True, exist_ok=True)
        if self._doc is None:
            self._doc = {"format": WORK_FORMAT, "version": 1, "job_id": job_id,
                         "input_sha256": input_sha, "units": {}}
            sidecar.write(self.manifest, self._doc)

    def part(self, pass_no: int, index: int) -> Path:
        # ".anon." keeps segment files out of a folder run that scans this folder.
        return self.path / f"p{pass_no}-{index:06d}.anon.mp4"

    def finished(self, digest: str) -> UnitResult | None:
        """A recorded unit whose segment file is still there, whole."""
        entry = (self._doc or {}).get("units", {}).get(digest)
        if entry is None:
            return None
        try:
            res = UnitResult.from_dict(entry, self.path)
        except (KeyError, TypeError, ValueError):
            return None
        try:
            ok = res.part.stat().st_size == res.size
        except OSError:
            ok = False
        return res if ok else None

    def record(self, digest: str, result: UnitResult) -> None:
        assert self._doc is not None
        self._doc["units"][digest] = result.as_dict()
        sidecar.write(self.manifest, self._doc)

    @property
    def units(self) -> int:
        return len((self._doc or {}).get("units", {}))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class FileManifest:
    """``<out_dir>/vidanon-manifest.json``: files a folder run finished.

    Shared by the threads of one run and by concurrent runs over the same folder: every
    update is a read-modify-write under a lock (thread lock, then ``flock`` on a lock file).
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / FILES_NAME
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(".vidanon-manifest.lock"),
                         os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"format": FILES_FORMAT, "version": 1, "files": {}}
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
            return {"format": FILES_FORMAT, "version": 1, "files": {}}
        return doc

    def done(self, key: str, inp: Path, out: Path) -> bool:
        """Finished, and neither the input nor the output changed since (stat + sidecar)."""
        entry = self._read()["files"].get(key)
        if not entry:
            return False
        try:
            st = inp.stat()
            if [st.st_size, st.st_mtime_ns] != entry["input_stat"]:
                return False
            if out.stat().st_size != entry["output_size"]:
                return False
            doc = json.loads(sidecar.sidecar_path(out).read_text())
            return doc["output"]["sha256"] == entry["output_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def add(self, key: str, inp: Path, out: Path) -> None:
        doc = json.loads(sidecar.sidecar_path(out).read_text())
        st = inp.stat()
        entry = {"input_stat": [st.st_size, st.st_mtime_ns], "input_sha256":
                 doc["input"]["sha256"], "output": os.path.relpath(out, self.path.parent),
                 "output_size": out.stat().st_size,
                 "output_sha256": doc["output"]["sha256"], "job_id": doc["job_id"]}
        with self._locked():
            files = self._read()
            files["files"][key] = entry
            sidecar.write(self.path, files)
