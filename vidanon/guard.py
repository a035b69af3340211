"""Privacy guard: vidanon checks every face it writes against the person it replaced.

No method anonymizes every face of every video: a weak prior, an odd pose or a tiny mask can
leave a face that a recogniser still matches to the original person. The guard embeds each
original aligned crop and its anonymized version with MobileFaceNet (bundled), in every frame
of every track, and a track whose anonymized face still matches in *any* frame fails.

"Matches" means a cosine at or above MobileFaceNet's threshold at FAR 0.1 % *for a face of that
size in the frame*: a face 10 px between the eyes, cut out and upscaled to a crop, is a blur,
and blurs of two different people score higher than two sharp faces do. Judged at the sharp
threshold, small faces would be escalated (and re-rendered, and finally blurred) on evidence
that impostor pairs of the same size produce 1 time in 1,000. The table comes from
``benchmarks/thresholds.py``; a fixed ``guard.threshold`` overrides it for every size.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np

from vidanon.align import blur_face
from vidanon.diffusion.models import ModelSpec, template_points
from vidanon.identity import FaceEmbedder
from vidanon.masks import FaceMasks
from vidanon.render import FaceJob

MFN_THRESHOLD = 0.4504  # sharp faces (eyes 54 px apart in a 128-px crop, or more)
THRESHOLD_SOURCE = ("MobileFaceNet cosine at FAR 0.1 % over 499,497 impostor pairs of 1,000 "
                    "adult UTKFace faces, shrunk to the face's eye distance and cut back to "
                    "128 px (benchmarks/thresholds.py)")
# Eye distance in the frame (px) -> MobileFaceNet cosine at FAR 0.1 % (benchmarks/results/
# thresholds.json); linear in between, the sharp threshold beyond the last entry.
SIZE_THRESHOLDS: dict[float, float] = {
    6: 0.7938, 8: 0.6484, 10: 0.5411, 12: 0.493, 16: 0.4617, 20: 0.4548, 24: 0.4524,
    32: 0.4516, 40: 0.4504, 54: MFN_THRESHOLD,
}


_SIZES = np.fromiter(SIZE_THRESHOLDS, float)
_COSINES = np.fromiter(SIZE_THRESHOLDS.values(), float)


def threshold_at(eye_px: float) -> float:
    """MobileFaceNet's same-person threshold (FAR 0.1 %) for a face ``eye_px`` wide."""
    return float(np.interp(eye_px, _SIZES, _COSINES))


PROBE_FRAMES = 3  # a track's worst frames kept: where an escalation is tried first


@dataclass
class TrackCheck:
    """A track's worst frame: the one closest to (or furthest past) its own threshold, and
    the few worst frames, where the guard tries the track's next escalation first."""

    frames: int = 0
    max_similarity: float = -1.0
    worst_frame: int = -1
    threshold: float = 1.0  # at the worst frame's face size
    worst: list[tuple[float, int]] = field(default_factory=list)  # (margin, frame), worst first
    # Every frame's margin, when seen in this process (a Ray unit reports ``worst`` only): an
    # escalation is tried on a track's frames worst first, so a failing step is found early.
    margins: dict[int, float] = field(default_factory=dict)

    @property
    def margin(self) -> float:
        return self.max_similarity - self.threshold

    def as_dict(self) -> dict:
        return {"frames_checked": self.frames,
                "max_similarity": round(self.max_similarity, 4),
                "worst_frame": self.worst_frame,
                "threshold": round(self.threshold, 4),
                "passed": self.max_similarity < self.threshold}

    def take(self, other: TrackCheck) -> None:
        """Fold in ``other`` (later frames): counts add up, the first worst frame stays."""
        self.frames += other.frames
        if other.margin > self.margin:
            self.max_similarity, self.worst_frame = other.max_similarity, other.worst_frame
            self.threshold = other.threshold
        pool = self.worst + (other.worst or [(other.margin, other.worst_frame)])
        self.worst = sorted(pool, key=lambda w: (-w[0], w[1]))[:PROBE_FRAMES]
        self.margins.update(other.margins)

    def worst_first(self, frames: list[int]) -> list[int]:
        """``frames`` ordered by how close they came to matching; unseen frames last, in
        order."""
        known = {f: m for m, f in self.worst} | self.margins
        return sorted(frames, key=lambda f: (-known.get(f, -np.inf), f))


@dataclass
class PrivacyGuard:
    """Collects, per track, the frame whose similarity comes closest to its threshold.

    ``threshold`` None judges each face at the threshold of its size (``threshold_at``); a
    number judges every face at that cosine.
    """

    spec: ModelSpec
    threshold: float | None = None
    blur_floor: bool = True  # False: judge by the threshold alone, even where a blur fails too
    tracks: dict[int, TrackCheck] = field(default_factory=dict)
    seconds: float = 0.0  # spent embedding: the guard's own share of a run

    def __post_init__(self) -> None:
        self._embedder = FaceEmbedder()
        self._pts = template_points(self.spec)
        self._oval_alpha = FaceMasks(self.spec, "oval").oval(1.0)[1]
        # Per (track, frame, crop digest): the original crop's embedding (float16) and its
        # similarity to its own blur. A face's original crop is the same in every pass,
        # probe and re-render, so escalations embed only the new anonymized crop; the digest
        # keeps a guard reused for another video (a Ray worker's) from ever mixing faces up.
        self._original: dict[tuple[int, int, bytes], np.ndarray] = {}
        self._blurred: dict[tuple[int, int, bytes], float] = {}

    def fresh(self) -> PrivacyGuard:
        """An empty guard with the same settings that shares this one's model and caches
        (the escalation probes' own record)."""
        other = PrivacyGuard.__new__(PrivacyGuard)
        other.__dict__.update(self.__dict__)
        other.tracks, other.seconds = {}, 0.0
        return other

    def threshold_for(self, eye_px: float) -> float:
        return threshold_at(eye_px) if self.threshold is None else self.threshold

    def embed(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        """Unit MobileFaceNet embeddings of aligned crops, one network call per batch."""
        return self._embedder.many(crops_bgr, self._pts)

    def observe(self, faces: list[tuple[int, int, float, bool]], originals: list[np.ndarray],
                anonymized: list[np.ndarray]) -> None:
        """``faces``: (track id, frame index, eye distance in the frame, blurred) per crop pair.

        A face matches when its similarity reaches the threshold of its size *and* exceeds
        that of the guard's own blur of the original (``blur_reference``): a dark, featureless
        face scores 0.8-0.9 against its own blur, so there the recogniser measures the lack of
        detail, not the person, and a replacement that differs more than a blur does is as
        private as the irreversible last resort. A blurred face is its own reference.
        """
        t0 = time.perf_counter()
        ids = [(tid, f, hashlib.blake2b(o.tobytes(), digest_size=12).digest())
               for (tid, f, _, _), o in zip(faces, originals)]
        new = [i for i, k in enumerate(ids) if k not in self._original]
        for i, e in zip(new, self.embed([originals[i] for i in new])):
            self._original[ids[i]] = e.astype(np.float16)
        emb = np.stack([self._original[k] for k in ids]).astype(np.float32)
        sims = np.sum(emb * self.embed(anonymized), axis=1)
        thr = np.array([self.threshold_for(e) for _, _, e, _ in faces])
        if self.blur_floor:
            blurred = np.array([b for _, _, _, b in faces], bool)
            ref = np.where(blurred, sims, -1.0)
            check = list(np.flatnonzero((sims >= thr) & ~blurred))
            new = [i for i in check if ids[i] not in self._blurred]
            if new:
                for i, r in zip(new, self.blur_reference([originals[i] for i in new], emb[new])):
                    self._blurred[ids[i]] = float(r)
            for i in check:
                ref[i] = self._blurred[ids[i]]
            # "More similar than a blur": a tie with the reference is not a match.
            thr = np.maximum(thr, ref + 1e-6)
        self.seconds += time.perf_counter() - t0
        for (tid, f, _, _), s, t in zip(faces, sims, thr):
            self.tracks.setdefault(tid, TrackCheck()).take(
                TrackCheck(1, float(s), int(f), float(t), margins={int(f): float(s - t)}))

    def blur_reference(self, originals: list[np.ndarray], embedded: np.ndarray) -> np.ndarray:
        """Similarity of each original (``embedded``: its embedding) to the guard's last
        resort: its oval blurred away."""
        identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        blurred = []
        for crop in originals:
            b = crop.copy()
            blur_face(b, identity, self.spec, self._oval_alpha)
            blurred.append(b)
        return np.sum(embedded * self.embed(blurred), axis=1)

    def merge(self, checks: dict[int, TrackCheck]) -> None:
        """Fold in what another guard saw over later frames (a segment rendered elsewhere).

        Merged in frame order, this gives what ``observe`` over the whole video gives.
        """
        for tid, c in checks.items():
            self.tracks.setdefault(tid, TrackCheck()).take(c)

    def failing(self) -> list[int]:
        return sorted(t for t, c in self.tracks.items() if c.margin >= 0)

    def failed(self, track_id: int) -> bool:
        """Already failing: a pass need not transform the track's later faces, as the
        escalation re-renders every one of them (``FrameRenderer.hold``)."""
        c = self.tracks.get(track_id)
        return c is not None and c.margin >= 0

    def forget(self, keep: list[int]) -> None:
        """Drop the per-frame records of every track but ``keep`` (those about to be
        escalated): an hour of three faces is ~300,000 of them."""
        wanted = set(keep)
        for cache in (self._original, self._blurred):  # in place: probes share them
            for k in [k for k in cache if k[0] not in wanted]:
                del cache[k]
        for t, c in self.tracks.items():
            if t not in wanted:
                c.margins = {}

    def reset(self, track_ids: list[int]) -> None:
        for t in track_ids:
            self.tracks.pop(t, None)


# What a failing track gets next, in order. A larger mask and a new key keep the face
# recoverable (both are recorded in the sidecar); a blur does not.
ESCALATIONS = ("mask", "key", "blur")


@dataclass
class Escalations:
    """Per-track escalation state: which steps a track has had, and what they change."""

    key_track: dict[int, int]  # track -> track whose key it uses (linking)
    mask_grow: float = 1.2
    level: dict[int, int] = field(default_factory=dict)

    def escalate(self, track_ids: list[int]) -> None:
        for t in track_ids:
            self.level[t] = self.level.get(t, 0) + 1
            if self.level[t] >= 2:  # its own, fresh key: no longer shared with linked tracks
                self.key_track[t] = t

    def steps(self, t: int) -> list[str]:
        return list(ESCALATIONS[: self.level.get(t, 0)])

    def epoch(self, t: int) -> int:
        return 1 if self.level.get(t, 0) >= 2 else 0

    def grow(self, t: int) -> float:
        return self.mask_grow if self.level.get(t, 0) >= 1 else 1.0

    def blurred(self, t: int) -> bool:
        return self.level.get(t, 0) >= 3


def escalated_plan(plan: dict[int, list[FaceJob]], esc: Escalations) -> dict[int, list[FaceJob]]:
    """The plan with every face of a track that exhausted the escalations blurred."""
    return {f: [FaceJob(j.track_id, j.matrix, "blur") if esc.blurred(j.track_id) else j
                for j in jobs] for f, jobs in plan.items()}


def privacy_summary(guard: PrivacyGuard | None, esc: Escalations,
                    plan: dict[int, list[FaceJob]], preset: str = "face") -> dict:
    """Counts for the run's one-line privacy summary (faces = face-frames), and a warning
    when a preset that keeps part of the face could not pass the guard."""
    per_track: dict[int, int] = {}
    for jobs in plan.values():
        for j in jobs:
            per_track[j.track_id] = per_track.get(j.track_id, 0) + 1
    blurred_tracks = sorted(t for t in per_track if esc.blurred(t))
    warning = None
    if preset.startswith("keep-") and blurred_tracks:
        kept = preset.removeprefix("keep-")
        warning = (f"warning: --mask {preset}: {len(blurred_tracks)} track(s) still matched "
                   f"the original with the {kept} kept and were blurred (not recoverable): "
                   f"tracks {', '.join(map(str, blurred_tracks))}")
    return {
        "verified": guard is not None,
        "faces_checked": sum(c.frames for c in guard.tracks.values()) if guard else 0,
        "faces_escalated": sum(n for t, n in per_track.items() if esc.level.get(t)),
        "faces_blurred": sum(n for t, n in per_track.items() if esc.blurred(t)),
        "tracks_escalated": sum(1 for t in per_track if esc.level.get(t)),
        **(_closest(guard) if guard else {"max_similarity": None, "threshold": None}),
        "preset_warning": warning,
    }


def _closest(guard: PrivacyGuard) -> dict:
    """The similarity and threshold of the face that came closest to matching."""
    worst = max(guard.tracks.values(), key=lambda c: c.margin, default=None)
    if worst is None:
        return {"max_similarity": -1.0, "threshold": guard.threshold_for(1e9)}
    return {"max_similarity": round(worst.max_similarity, 4),
            "threshold": round(worst.threshold, 4)}
