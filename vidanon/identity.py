"""Linking tracks of the same person (``--link-identities``), IDDiffuse-style identity mapping.

A person who leaves and re-enters the scene gets a new track; with linking, both tracks use
one key and so one pseudo-identity, which keeps the anonymized video coherent for viewers and
for downstream analytics (re-identification across a scene still works on pseudo-faces).
Embeddings come from MobileFaceNet (Apache-2.0, bundled ONNX, run by ONNX Runtime on one
thread: 3.6 ms a face against OpenCV DNN's 6.9 ms batched on two, the same embeddings to
5e-6; the privacy guard embeds every face, so this is much of its cost).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from vidanon.align import similarity
from vidanon.media import read_frames
from vidanon.track import Track

MOBILEFACENET = Path(__file__).resolve().parent / "assets" / "MobileFaceNet.onnx"
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])


class FaceEmbedder:
    def __init__(self, model_path: Path = MOBILEFACENET) -> None:
        opts = ort.SessionOptions()
        # One thread, no pool: two threads gain 3 % on this small network, would compete with
        # torch's between UNet batches, and a pool's threads do not survive a fork (a forked
        # child that frees an inherited session waits for them forever).
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self._net = ort.InferenceSession(str(model_path), opts,
                                         providers=["CPUExecutionProvider"])
        self._input = self._net.get_inputs()[0].name

    def __call__(self, frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return self.many([frame], landmarks)[0]

    def many(self, images: list[np.ndarray], landmarks: np.ndarray) -> np.ndarray:
        """Unit embeddings (N, 128) of BGR images whose faces sit at the same ``landmarks``
        (aligned crops); the privacy guard embeds every face."""
        if not images:
            return np.zeros((0, 128), np.float32)
        m = similarity(landmarks, ARCFACE_112)
        crops = np.stack([cv2.warpAffine(im, m, (112, 112), flags=cv2.INTER_LINEAR)
                          for im in images])
        blob = np.ascontiguousarray(
            ((crops[..., ::-1].astype(np.float32) - 127.5) / 128.0).transpose(0, 3, 1, 2))
        # The bundled graph has a fixed batch of one.
        e = np.concatenate([self._net.run(None, {self._input: blob[i:i + 1]})[0].reshape(1, -1)
                            for i in range(len(blob))])
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-9)


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
