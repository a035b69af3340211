"""Privacy guard: vidanon checks every face it writes against the person it replaced.

No method anonymizes every face of every video: a weak prior, an odd pose or a tiny mask can
leave a face that a recogniser still matches to the original person. The guard embeds each
original aligned crop and its anonymized version with MobileFaceNet (bundled), in every frame
of every track, and a track whose anonymized face still matches in *any* frame fails.

The threshold is MobileFaceNet's cosine at FAR 0.1 % on sharp faces: 0.4504, measured over
499,497 impostor pairs of 1,000 adult UTKFace faces at 128 px (``benchmarks._identity.
sharp_thresholds``). Thresholds from small or blurry faces are much looser (0.67 from 64-px
crops), and would let leaks through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from vidanon.diffusion.models import ModelSpec, template_points
from vidanon.identity import FaceEmbedder
from vidanon.render import FaceJob

MFN_THRESHOLD = 0.4504
THRESHOLD_SOURCE = ("MobileFaceNet cosine at FAR 0.1 % over 499,497 impostor pairs of 1,000 "
                    "adult UTKFace faces at 128 px")


@dataclass
class TrackCheck:
    frames: int = 0
    max_similarity: float = -1.0
    worst_frame: int = -1

    def as_dict(self, threshold: float) -> dict:
        return {"frames_checked": self.frames,
                "max_similarity": round(self.max_similarity, 4),
                "worst_frame": self.worst_frame,
                "threshold": threshold,
                "passed": self.max_similarity < threshold}


@dataclass
class PrivacyGuard:
    """Collects, per track, the highest original-vs-anonymized similarity seen."""

    spec: ModelSpec
    threshold: float = MFN_THRESHOLD
    tracks: dict[int, TrackCheck] = field(default_factory=dict)
    seconds: float = 0.0  # spent embedding: the guard's own share of a run

    def __post_init__(self) -> None:
        self._embedder = FaceEmbedder()
        self._pts = template_points(self.spec)

    def embed(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        """Unit MobileFaceNet embeddings of aligned crops, one network call per batch."""
        return self._embedder.many(crops_bgr, self._pts)

    def observe(self, faces: list[tuple[int, int]], originals: list[np.ndarray],
                anonymized: list[np.ndarray]) -> None:
        """``faces``: (track id, frame index) of each crop pair."""
        t0 = time.perf_counter()
        sims = np.sum(self.embed(originals) * self.embed(anonymized), axis=1)
        self.seconds += time.perf_counter() - t0
        for (tid, f), s in zip(faces, sims):
            chk = self.tracks.setdefault(tid, TrackCheck())
            chk.frames += 1
            if s > chk.max_similarity:
                chk.max_similarity, chk.worst_frame = float(s), int(f)

    def merge(self, checks: dict[int, TrackCheck]) -> None:
        """Fold in what another guard saw over later frames (a segment rendered elsewhere).

        Merged in frame order, this gives what ``observe`` over the whole video gives: the
        counts add up and the first frame reaching the highest similarity stays the worst.
        """
        for tid, c in checks.items():
            chk = self.tracks.setdefault(tid, TrackCheck())
            chk.frames += c.frames
            if c.max_similarity > chk.max_similarity:
                chk.max_similarity, chk.worst_frame = c.max_similarity, c.worst_frame

    def failing(self) -> list[int]:
        return sorted(t for t, c in self.tracks.items() if c.max_similarity >= self.threshold)

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
        "max_similarity": round(max((c.max_similarity for c in guard.tracks.values()),
                                    default=-1.0), 4) if guard else None,
        "threshold": guard.threshold if guard else None,
        "preset_warning": warning,
    }
