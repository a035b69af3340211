"""Rebuild samples/crowd.mp4: the 3-second span of the source clip with the most faces.

Run from the repository root:  python samples/make_sample.py [SOURCE] [DEST]

The span is chosen by running the bundled YuNet face detector on every 5th frame and taking
the window with the highest mean face count (ties: larger faces), so the sample exercises
multi-face tracking rather than a single close-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from vidanon.media import EncodeSettings, cut, probe, read_frames

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path("/work/shared/videos/audience_multi_face_640x360.mp4")
DEST = ROOT / "samples" / "crowd.mp4"
DETECTOR = ROOT / "vidanon" / "assets" / "face_detection_yunet_2023mar.onnx"
WINDOW_S = 3.0
# Only the first 2 s of the chosen window are kept: one face, then a crowd of 5-7, which
# keeps a newcomer's first CPU run (about 185 face crops) well under 3 minutes.
KEEP_S = 2.0
STEP = 5


def face_stats(source: Path) -> dict[int, tuple[int, float]]:
    """Face count and total face area (pixels) for every STEP-th frame index."""
    info = probe(source)
    detector = cv2.FaceDetectorYN.create(
        str(DETECTOR), "", (info.width, info.height), 0.6, 0.3, 5000
    )
    stats: dict[int, tuple[int, float]] = {}
    for frame in read_frames(source):
        if frame.index % STEP:
            continue
        _, faces = detector.detect(frame.image)
        faces = np.zeros((0, 15)) if faces is None else faces
        stats[frame.index] = (len(faces), float(np.sum(faces[:, 2] * faces[:, 3])))
    return stats


def best_start(stats: dict[int, tuple[int, float]], window: int, frames: int) -> int:
    """First frame of the window with the most faces on average, then the largest area."""
    best: tuple[float, float, int] | None = None
    for start in range(0, frames - window + 1, STEP):
        inside = [v for i, v in stats.items() if start <= i < start + window]
        score = (
            sum(c for c, _ in inside) / len(inside),
            sum(a for _, a in inside) / len(inside),
            -start,
        )
        best = score if best is None or score > best else best
    assert best is not None
    return -best[2]


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    dest = Path(sys.argv[2]) if len(sys.argv) > 2 else DEST
    info = probe(source)
    window = round(WINDOW_S * info.fps)
    start = best_start(face_stats(source), window, info.frames)
    # Half a frame early so float rounding cannot drop the first frame of the window.
    start_s = max(0.0, float((start - 0.5) / info.fps))
    out = cut(source, dest, start_s, KEEP_S, EncodeSettings(crf=18))
    print(f"frames {start}..{start + out.frames - 1} (from {start_s:.3f} s): {out}")


if __name__ == "__main__":
    main()
