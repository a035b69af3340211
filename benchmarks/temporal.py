"""Temporal consistency of the anonymized video, per track.

    python -m benchmarks.temporal [--video samples/crowd.mp4] [--config default]

For each track of an anonymized video (run here): identity consistency = mean cosine
(MobileFaceNet) between the track's faces at different frames, anonymized vs original (a
consistent pseudo-identity keeps it close to the original's); flicker = mean absolute change
between consecutive aligned face crops, anonymized vs original; coverage = share of the
track's detected frames that were replaced (anything else leaked).
Writes benchmarks/results/temporal.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from vidanon import sidecar
from vidanon.align import warp_crop
from vidanon.config import load_settings
from vidanon.diffusion.models import load_model, template_points
from vidanon.identity import FaceEmbedder
from vidanon.media import read_frames
from vidanon.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "temporal.json"


def track_crops(video: Path, track: dict, size: int) -> list[np.ndarray]:
    by_frame = {r["f"]: np.asarray(r["m"]).reshape(2, 3) for r in track["frames"]
                if r["mode"] == "diffusion"}
    return [warp_crop(f.image, by_frame[f.index], size) for f in read_frames(video)
            if f.index in by_frame]


def consistency(emb: FaceEmbedder, crops: list[np.ndarray], pts: np.ndarray) -> float:
    e = np.stack([emb(c, pts) for c in crops[:: max(1, len(crops) // 12)]])
    sims = e @ e.T
    n = len(e)
    return float((sims.sum() - n) / max(n * (n - 1), 1))


def flicker(crops: list[np.ndarray]) -> float:
    if len(crops) < 2:
        return 0.0
    return float(np.mean([np.abs(a.astype(np.float32) - b).mean()
                          for a, b in zip(crops, crops[1:])]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", type=Path, default=ROOT / "samples" / "crowd.mp4")
    ap.add_argument("--config", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--min-frames", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    spec = load_model(a.model).spec
    emb = FaceEmbedder()
    pts = template_points(spec)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        res = run(a.video, Path(tmp) / "anon.mp4", Path(tmp) / "ring.json",
                  load_settings(a.config), a.model, quiet=True)
        doc = sidecar.read(res.sidecar)
        for tr in doc["tracks"]:
            if len(tr["frames"]) < a.min_frames:
                continue
            orig = track_crops(a.video, tr, spec.crop_size)
            anon = track_crops(res.output, tr, spec.crop_size)
            replaced = sum(r["mode"] == "diffusion" for r in tr["frames"])
            rows.append({
                "track": tr["id"], "frames": len(tr["frames"]),
                "id_consistency_original": round(consistency(emb, orig, pts), 3),
                "id_consistency_anonymized": round(consistency(emb, anon, pts), 3),
                "flicker_original": round(flicker(orig), 2),
                "flicker_anonymized": round(flicker(anon), 2),
                "coverage_of_detected": round(replaced / max(tr["detected_frames"], 1), 3),
            })
    result = {"video": a.video.name, "model": spec.name, "tracks": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    md = ["## Temporal consistency", "",
          f"`python -m benchmarks.temporal` on `{a.video.name}`, model `{spec.name}`: per track "
          f"with ≥ {a.min_frames} frames, mean identity cosine between the track's faces at "
          "different frames (original vs anonymized), flicker (mean absolute change between "
          "consecutive aligned crops, 0-255), and coverage (replaced / detected frames; "
          "> 1 where gap filling and padding add frames).", "",
          "| track | frames | id consistency orig | id consistency anon | flicker orig | "
          "flicker anon | coverage |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['track']} | {r['frames']} | {r['id_consistency_original']} | "
                  f"{r['id_consistency_anonymized']} | {r['flicker_original']} | "
                  f"{r['flicker_anonymized']} | {r['coverage_of_detected']} |")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
