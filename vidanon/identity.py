"""Linking tracks of the same person (``--link-identities``), IDDiffuse-style identity mapping.

A person who leaves and re-enters the scene gets a new track; with linking, both tracks use
one key and so one pseudo-identity, which keeps the anonymized video coherent for viewers and
for downstream analytics (re-identification across a scene still works on pseudo-faces).
Embeddings come from MobileFaceNet (Apache-2.0, bundled ONNX, run by OpenCV's DNN module).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vidanon.align import similarity
from vidanon.media import read_frames
from vidanon.track import Track

MOBILEFACENET = Path(__file__).resolve().parent / "assets" / "MobileFaceNet.onnx"
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])


class FaceEmbedder:
    def __init__(self, model_path: Path = MOBILEFACENET) -> None:
        self._net = cv2.dnn.readNetFromONNX(str(model_path))

    def __call__(self, frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        m = similarity(landmarks, ARCFACE_112)
        crop = cv2.warpAffine(frame, m, (112, 112), flags=cv2.INTER_LINEAR)
        blob = (crop[..., ::-1].astype(np.float32) - 127.5) / 128.0
        self._net.setInput(np.ascontiguousarray(blob.transpose(2, 0, 1)[None]))
        e = self._net.forward().ravel()
        return e / max(float(np.linalg.norm(e)), 1e-9)


def _best_frames(tr: Track, k: int) -> list[int]:
    det = sorted(tr.detected, key=lambda f: -float(np.prod(tr.boxes[f][2:] - tr.boxes[f][:2])))
    return det[:k]


def link_tracks(video: Path, tracks: list[Track], threshold: float = 0.6,
                per_track: int = 3) -> dict[int, int]:
    """Map each track id to the id whose key it uses (its own unless linked).

    Tracks that overlap in time are never linked (one person is not in two places), and a
    group's representative is its earliest track.
    """
    want: dict[int, list[tuple[Track, int]]] = {}
    for tr in tracks:
        for f in _best_frames(tr, per_track):
            want.setdefault(f, []).append((tr, f))
    embed = FaceEmbedder()
    sums: dict[int, np.ndarray] = {}
    for frame in read_frames(video):
        for tr, f in want.get(frame.index, []):
            e = embed(frame.image, tr.landmarks[f])
            sums[tr.id] = sums.get(tr.id, 0) + e
    emb = {t: v / np.linalg.norm(v) for t, v in sums.items()}
    parent = {tr.id: tr.id for tr in tracks}
    span = {tr.id: (tr.first, tr.last) for tr in tracks}
    groups: dict[int, list[int]] = {tr.id: [tr.id] for tr in tracks}

    def root(t: int) -> int:
        while parent[t] != t:
            t = parent[t]
        return t

    pairs = sorted(
        ((float(emb[a] @ emb[b]), a, b) for a in emb for b in emb if a < b), reverse=True
    )
    for sim, a, b in pairs:
        if sim < threshold:
            break
        ra, rb = root(a), root(b)
        if ra == rb:
            continue
        overlap = any(span[x][0] <= span[y][1] and span[y][0] <= span[x][1]
                      for x in groups[ra] for y in groups[rb])
        if overlap:
            continue
        keep, drop = min(ra, rb), max(ra, rb)
        parent[drop] = keep
        groups[keep] += groups.pop(drop)
    return {tr.id: root(tr.id) for tr in tracks}
