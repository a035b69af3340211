"""The 5-point crop template of the training faces, measured with the bundled YuNet detector.

The pipeline aligns every video face to this template before running the prior, so it must
describe how the *training* crops are framed (UTKFace crops are much tighter than FFHQ's):
measuring it with the same detector the pipeline uses keeps detector bias out of alignment.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vidanon.prior.train import face_oval_from_template

YUNET = Path(__file__).resolve().parents[1] / "assets" / "face_detection_yunet_2023mar.onnx"


def detect_landmarks(
    faces_rgb: np.ndarray, pad_frac: float = 0.25, score_threshold: float = 0.5
) -> np.ndarray:
    """YuNet landmarks per face as crop fractions, (N, 5, 2); NaN where not exactly one face.

    Each face is padded by ``pad_frac`` of its side with replicated edge pixels first: UTKFace
    crops end at the chin and temples, and YuNet misses faces that touch the image border.
    Points are in YuNet order (eyes, nose, mouth corners), not yet sorted left/right.
    """
    n, h, w = faces_rgb.shape[:3]
    pad = int(round(pad_frac * max(h, w)))
    size = (w + 2 * pad, h + 2 * pad)
    det = cv2.FaceDetectorYN.create(str(YUNET), "", size, score_threshold, 0.3, 5000)
    out = np.full((n, 5, 2), np.nan)
    for i in range(n):
        bgr = np.ascontiguousarray(faces_rgb[i][..., ::-1])
        img = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        _, found = det.detect(img)
        if found is None or len(found) != 1:
            continue
        pts = found[0, 4:14].reshape(5, 2).astype(np.float64) - pad
        out[i] = pts / np.array([w, h], dtype=np.float64)
    return out


def template_from_landmarks(landmarks: np.ndarray) -> tuple[list[list[float]], list[float]]:
    """Median template over faces with landmarks, ordered [left eye, right eye, nose, left
    mouth corner, right mouth corner] as seen in the image (smaller x first), and its oval."""
    ok = ~np.isnan(landmarks).any(axis=(1, 2))
    if not ok.any():
        raise ValueError("no face with landmarks to measure a template from")
    pts = landmarks[ok].copy()
    for a, b in ((0, 1), (3, 4)):  # per face, put the smaller-x point first
        swap = pts[:, a, 0] > pts[:, b, 0]
        pts[swap, a], pts[swap, b] = pts[swap, b].copy(), pts[swap, a].copy()
    med = np.median(pts, axis=0)
    template = [[round(float(x), 4), round(float(y), 4)] for x, y in med]
    return template, face_oval_from_template(template)


def measure_template(faces_rgb: np.ndarray) -> tuple[list[list[float]], list[float]]:
    """(template 5x2 crop fractions, face oval [cx, cy, rx, ry]) of uint8 RGB face crops."""
    return template_from_landmarks(detect_landmarks(faces_rgb))


def detection_rate(landmarks: np.ndarray) -> float:
    """Fraction of faces where exactly one face was found."""
    return float((~np.isnan(landmarks).any(axis=(1, 2))).mean())
