"""Side-by-side pictures for people to look at: original | anonymized | recovered.

    python -m benchmarks.pictures [--config default] [--seconds 2]

For one large-face clip and the crowd sample: anonymize the first ``--seconds``, recover every
track with its key, and write one frame of each as ``docs/sidebyside_<clip>.png`` (the large
face also as a close-up around it). Numbers do not say whether a replacement looks like a
face in the scene's light; these pictures do.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from benchmarks._common import ROOT, VIDEOS
from benchmarks.leak import source_clip
from vidanon import sidecar
from vidanon.config import load_settings
from vidanon.media import read_frames
from vidanon.pipeline import recover, run

DOCS = ROOT / "docs"


def frame_at(path: Path, index: int) -> np.ndarray:
    for f in read_frames(path):
        if f.index == index:
            return f.image
    raise ValueError(f"{path} has no frame {index}")


def label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    scale = max(0.5, img.shape[1] / 700)
    cv2.putText(out, text, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                int(4 * scale), cv2.LINE_AA)
    cv2.putText(out, text, (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (255, 255, 255), max(1, int(1.5 * scale)), cv2.LINE_AA)
    return out


def triptych(images: list[np.ndarray], names: list[str], gap: int = 4) -> np.ndarray:
    h = images[0].shape[0]
    parts = []
    for i, (im, n) in enumerate(zip(images, names)):
        parts.append(label(im, n))
        if i < len(images) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def make(clip: Path, settings: dict, seconds: float, frame: int, close_up: bool,
         docs: Path = DOCS) -> list[Path]:
    src = source_clip(clip, seconds)
    work = Path(tempfile.mkdtemp())
    try:
        anon = work / f"{clip.stem}.anon.mp4"
        res = run(src, anon, work / "keys.json", settings, quiet=True)
        doc = json.loads(sidecar.sidecar_path(anon).read_text())
        tracks = [t["id"] for t in doc["tracks"]]
        rec = recover(anon, tracks, work / "rec.mp4", keyring_path=res.keyring, quiet=True)
        imgs = [frame_at(p, frame) for p in (src, anon, rec)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = ["original", "anonymized", "recovered (key)"]
    out = [docs / f"sidebyside_{clip.stem}.png"]
    cv2.imwrite(str(out[0]), triptych(imgs, names))
    if close_up:
        # Around the largest face that the sidecar lists in this frame.
        frames = [r for t in doc["tracks"] for r in t["frames"] if r["f"] == frame]
        if frames:
            m = np.asarray(frames[0]["m"]).reshape(2, 3)
            inv = cv2.invertAffineTransform(m)
            size = doc["model"]["crop_size"]
            c = inv @ np.array([size / 2, size / 2, 1.0])
            half = int(0.8 * size / np.sqrt(abs(np.linalg.det(m[:, :2]))))
            h, w = imgs[0].shape[:2]
            x0, y0 = max(int(c[0]) - half, 0), max(int(c[1]) - half, 0)
            x1, y1 = min(int(c[0]) + half, w), min(int(c[1]) + half, h)
            crops = [cv2.resize(im[y0:y1, x0:x1], (384, int(384 * (y1 - y0) / (x1 - x0))),
                                interpolation=cv2.INTER_AREA) for im in imgs]
            out.append(docs / f"sidebyside_{clip.stem}_face.png")
            cv2.imwrite(str(out[1]), triptych(crops, names))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pictures", description=__doc__)
    ap.add_argument("--config", default="default")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--frame", type=int, default=12)
    ap.add_argument("--out-dir", type=Path, default=DOCS, help="where the PNGs go")
    a = ap.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(a.config, a.sets)
    for clip, close in ((VIDEOS / "head_motion_a.mp4", True), (ROOT / "samples" / "crowd.mp4",
                                                                 True)):
        for p in make(clip, settings, a.seconds, a.frame, close, a.out_dir):
            print(p)


if __name__ == "__main__":
    main()
