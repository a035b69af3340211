"""Recovery through the codec: run -> recover one track, lossless (default) and H.264.

    python -m benchmarks.recovery [--frames 24] [--config default]

Cuts the first frames of samples/crowd.mp4 (one large face), anonymizes them, recovers the
largest track with its key, and measures PSNR of that track's face region against the
original: anonymized vs recovered, for the lossless default, H.264 CRF 12 and CRF 18; and
the share of the track's frames whose recovered face passes the MobileFaceNet
same-person threshold (FAR 0.1 %, from benchmarks/results/quality.json) against the original.
Writes benchmarks/results/recovery.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks._identity import MobileFaceNetId
from benchmarks.temporal import track_crops
from vidanon import sidecar
from vidanon.align import oval_mask, to_tensor_batch
from vidanon.config import load_settings
from vidanon.diffusion.models import load_model
from vidanon.media import cut, read_frames
from vidanon.pipeline import recover, run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "recovery.json"


def face_psnr(a: list[np.ndarray], b: list[np.ndarray], masks: list[np.ndarray]) -> float:
    num = den = 0.0
    for x, y, m in zip(a, b, masks):
        w = m[..., None].astype(np.float64)
        num += float((((x.astype(np.float64) - y) ** 2) * w).sum())
        den += float(w.sum() * 3)
    return round(10 * np.log10(255.0**2 / max(num / max(den, 1), 1e-12)), 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a setting for this run, e.g. diffusion.temperature=0.9")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    spec = load_model(a.model).spec
    idm = MobileFaceNetId(spec)
    q = ROOT / "benchmarks" / "results" / "quality.json"
    thr = (json.loads(q.read_text())["identity_models"]["MobileFaceNet"]["threshold_far_0.1pct"]
           if q.exists() else 0.6731)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        clip = t / "clip.mp4"
        cut(ROOT / "samples" / "crowd.mp4", clip, 0.0, a.frames / 29.97)
        orig = [f.image for f in read_frames(clip)]
        for label, lossless, crf in (("lossless (default)", True, 12), ("H.264 CRF 12", False, 12),
                                     ("H.264 CRF 18 (publish preset)", False, 18)):
            settings = load_settings(a.config, [*a.overrides,
                                                f"encode.lossless={str(lossless).lower()}",
                                                f"encode.crf={crf}"])
            t0 = time.time()
            res = run(clip, t / f"a{label[:8]}{crf}.mp4", t / "ring.json", settings, a.model,
                      quiet=True)
            t_run = time.time() - t0
            doc = sidecar.read(res.sidecar)
            track = max(doc["tracks"], key=lambda tr: len(tr["frames"]))
            t0 = time.time()
            rec = recover(res.output, [track["id"]], t / f"r{label[:8]}{crf}.mp4",
                          keyring_path=t / "ring.json", model_name=a.model, quiet=True)
            t_rec = time.time() - t0
            oval = oval_mask(spec)
            masks = [np.zeros(orig[0].shape[:2], np.float32) for _ in orig]
            for r in track["frames"]:
                m = np.asarray(r["m"]).reshape(2, 3)
                h, w = orig[0].shape[:2]
                masks[r["f"]] = cv2.warpAffine(oval, m, (w, h), flags=cv2.WARP_INVERSE_MAP) > 0.99
            anon = [f.image for f in read_frames(res.output)]
            back = [f.image for f in read_frames(rec)]
            e0 = idm.embed(to_tensor_batch(track_crops(clip, track, spec.crop_size)))
            e1 = idm.embed(to_tensor_batch(track_crops(rec, track, spec.crop_size)))
            cos = np.sum(e0 * e1, axis=1)
            rows[label] = {
                "identity_cos_recovered": round(float(cos.mean()), 4),
                "identity_above_threshold": round(float((cos >= thr).mean()), 4),
                "face_psnr_anonymized_db": face_psnr(orig, anon, masks),
                "face_psnr_recovered_db": face_psnr(orig, back, masks),
                "track_frames": len(track["frames"]),
                "run_s": round(t_run, 1),
                "recover_s": round(t_rec, 1),
            }
    result = {"clip": f"samples/crowd.mp4, first {a.frames} frames", "model": spec.name,
              "settings": {k: doc["settings"]["diffusion"].get(k)  # as resolved for the run
                           for k in ("steps", "refine", "tol", "temperature", "anchor",
                                     "frame_fit")},
              "threshold": thr,
              "results": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    fit = result["settings"].get("frame_fit") or 0
    md = ["## Recovery through the codec" + (f", frame fit {fit}" if fit else ""), "",
          f"`python -m benchmarks.recovery`: {result['clip']}, model `{spec.name}`, "
          f"default preset ({result['settings']}). PSNR over the recovered track's face oval, "
          "against the original frames; identity = MobileFaceNet cosine of the recovered "
          f"aligned face to the original, and the share of frames above {thr} (FAR 0.1 %).",
          "", "| output encoding | anonymized dB | recovered dB | identity cos | frames above "
          "| frames | run s | recover s |", "|---|---|---|---|---|---|---|---|"]
    for k, v in rows.items():
        md.append(f"| {k} | {v['face_psnr_anonymized_db']} | {v['face_psnr_recovered_db']} | "
                  f"{v['identity_cos_recovered']} | "
                  f"{100 * v['identity_above_threshold']:.0f} % | "
                  f"{v['track_frames']} | {v['run_s']} | {v['recover_s']} |")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
