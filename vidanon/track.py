"""Tracking faces across frames (ByteTrack from ``trackers``), then gap filling and smoothing.

A face the detector misses for a few frames must still be anonymized in those frames: the
most common complaint about frame-by-frame tools is a face flashing up when the detector
blinks.  So tracking runs over the whole video first (detections are small), gaps inside a
track are interpolated, each track is padded by a few frames at both ends, and landmarks are
smoothed so the aligned crops (and with them the generated faces) do not jitter.
Detections the tracker leaves unassigned are never dropped: they join a neighbouring track
or become a track of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import supervision as sv
from scipy.signal import savgol_filter
from trackers import ByteTrackTracker


@dataclass
class Track:
    id: int
    landmarks: dict[int, np.ndarray] = field(default_factory=dict)  # frame -> (5, 2)
    boxes: dict[int, np.ndarray] = field(default_factory=dict)  # frame -> xyxy
    detected: set[int] = field(default_factory=set)  # frames with a real detection

    @property
    def first(self) -> int:
        return min(self.landmarks)

    @property
    def last(self) -> int:
        return max(self.landmarks)


class SceneCuts:
    """Callable frame -> True at the first frame of a new shot.

    Two signals must agree. The mean absolute change of a 64x36 grey thumbnail is under 2
    between ordinary frames of the shared clips and about 28 at a cut, but a fast camera
    swing (walking clip, frame 13) also reaches 28. The Bhattacharyya distance between
    hue/saturation histograms separates them: 0.42-0.61 at the four real cuts, at most 0.15
    anywhere else in the shared clips. A grey threshold of 0 turns detection off.
    """

    def __init__(self, threshold: float, hist_threshold: float = 0.3) -> None:
        self.threshold = threshold
        self.hist_threshold = hist_threshold
        self._prev: tuple[np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _signature(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        small = cv2.resize(image, (64, 36), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
        return grey, cv2.normalize(hist, hist).flatten()

    def __call__(self, image: np.ndarray) -> bool:
        if self.threshold <= 0:
            return False
        sig = self._signature(image)
        prev, self._prev = self._prev, sig
        if prev is None or float(np.abs(sig[0] - prev[0]).mean()) <= self.threshold:
            return False
        return cv2.compareHist(prev[1], sig[1], cv2.HISTCMP_BHATTACHARYYA) > self.hist_threshold


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceTracker:
    """Feed detections frame by frame with ``update``; ``finish`` returns clean tracks."""

    def __init__(self, fps: float, lost_buffer_s: float = 1.0, threshold: float = 0.6) -> None:
        self._bt_args = dict(
            lost_track_buffer=max(1, round(lost_buffer_s * fps)),
            frame_rate=fps,
            track_activation_threshold=threshold,
            minimum_consecutive_frames=1,
            high_conf_det_threshold=threshold,
        )
        self._bt = ByteTrackTracker(**self._bt_args)
        self._tracks: dict[int, Track] = {}
        self._orphans: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self._shot = 0  # tracks never continue across a shot cut
        self._shot_of: dict[int, int] = {}
        self._cuts: list[int] = []  # first frame of each shot after the first

    def new_shot(self, frame_index: int) -> None:
        """Start afresh after a scene cut: IoU matching across a cut would hand one person's
        track (and key) to whoever appears at the same place in the next shot."""
        self._bt = ByteTrackTracker(**self._bt_args)
        self._shot += 1
        self._cuts.append(frame_index)

    def update(self, frame_index: int, dets: sv.Detections) -> None:
        if len(dets) == 0:
            self._bt.update(dets)
            return
        out = self._bt.update(dets)
        lms = out.data["landmarks"]
        for i in range(len(out)):
            tid = int(out.tracker_id[i])
            if tid < 0:
                self._orphans.append((frame_index, self._shot, out.xyxy[i].copy(),
                                      lms[i].copy()))
                continue
            tid += self._shot * 1_000_000  # ids restart per tracker; keep shots apart
            tr = self._tracks.setdefault(tid, Track(tid))
            self._shot_of[tid] = self._shot
            tr.landmarks[frame_index] = lms[i].astype(np.float64)
            tr.boxes[frame_index] = out.xyxy[i].astype(np.float64)
            tr.detected.add(frame_index)

    def _adopt_orphans(self) -> None:
        next_id = max(self._tracks, default=0) + 1
        for f, shot, box, lm in self._orphans:
            best, best_iou = None, 0.3
            for tr in self._tracks.values():
                if f in tr.landmarks or self._shot_of[tr.id] != shot:
                    continue
                for g in (f + 1, f - 1):
                    if g in tr.boxes and (iou := _iou(tr.boxes[g], box)) > best_iou:
                        best, best_iou = tr, iou
            if best is None:
                best = self._tracks.setdefault(next_id, Track(next_id))
                self._shot_of[next_id] = shot
                next_id += 1
            best.landmarks[f] = lm.astype(np.float64)
            best.boxes[f] = box.astype(np.float64)
            best.detected.add(f)
        self._orphans.clear()

    def finish(self, n_frames: int, max_gap: int = 15, pad: int = 2,
               smooth: int = 7) -> list[Track]:
        """Fill gaps up to ``max_gap`` frames, pad ends by ``pad``, smooth; ids from 1."""
        self._adopt_orphans()
        tracks = sorted(self._tracks.values(), key=lambda t: (t.first, t.id))
        result = []
        for new_id, tr in enumerate(tracks, start=1):
            fill_gaps(tr, max_gap)
            smooth_track(tr, smooth)
            bounds = [0, *self._cuts, n_frames]
            shot = self._shot_of[tr.id]
            pad_track(tr, pad, bounds[shot], bounds[shot + 1])
            tr.id = new_id
            result.append(tr)
        return result


def _segments(frames: list[int]) -> list[list[int]]:
    segs: list[list[int]] = []
    for f in frames:
        if segs and f == segs[-1][-1] + 1:
            segs[-1].append(f)
        else:
            segs.append([f])
    return segs


def fill_gaps(tr: Track, max_gap: int) -> None:
    """Linear interpolation of landmarks and boxes across gaps of at most ``max_gap`` frames."""
    frames = sorted(tr.landmarks)
    for a, b in zip(frames, frames[1:]):
        gap = b - a - 1
        if 0 < gap <= max_gap:
            for f in range(a + 1, b):
                w = (f - a) / (b - a)
                tr.landmarks[f] = (1 - w) * tr.landmarks[a] + w * tr.landmarks[b]
                tr.boxes[f] = (1 - w) * tr.boxes[a] + w * tr.boxes[b]


def smooth_track(tr: Track, window: int) -> None:
    """Savitzky-Golay smoothing per contiguous run: removes detector jitter, keeps motion."""
    if window < 3:
        return
    for seg in _segments(sorted(tr.landmarks)):
        w = min(window, len(seg) if len(seg) % 2 else len(seg) - 1)
        if w < 5:
            continue
        arr = np.stack([tr.landmarks[f] for f in seg])
        arr = savgol_filter(arr, w, 2, axis=0, mode="nearest")
        for f, v in zip(seg, arr):
            tr.landmarks[f] = v


def pad_track(tr: Track, pad: int, start: int, end: int) -> None:
    """Hold the first/last pose for ``pad`` frames within [start, end) (the track's shot):
    detectors tend to pick faces up late."""
    first, last = tr.first, tr.last
    for f in range(max(start, first - pad), first):
        tr.landmarks[f] = tr.landmarks[first]
        tr.boxes[f] = tr.boxes[first]
    for f in range(last + 1, min(end, last + pad + 1)):
        tr.landmarks[f] = tr.landmarks[last]
        tr.boxes[f] = tr.boxes[last]


def faces_by_frame(tracks: list[Track]) -> dict[int, list[tuple[int, np.ndarray]]]:
    """frame -> [(track id, landmarks)], the plan the rendering pass follows."""
    plan: dict[int, list[tuple[int, np.ndarray]]] = {}
    for tr in tracks:
        for f, lm in tr.landmarks.items():
            plan.setdefault(f, []).append((tr.id, lm))
    return plan
