"""Temporal consistency and utility of anonymized videos, per track and per video.

    python -m benchmarks.temporal [--video V ...] [--config default]

For each track of an anonymized video (run here): identity consistency = mean cosine
(MobileFaceNet) between the track's faces at different frames, anonymized vs original (a
consistent pseudo-identity keeps it close to the original's); flicker = mean absolute change
between consecutive aligned face crops, anonymized vs original; coverage = share of the
track's detected frames that were replaced (anything else leaked).

Per video (utility): PSNR and SSIM of every frame outside the pasted face regions (should be
near-lossless: only the codec touches it), and the share of replaced faces that the detector
still finds in the anonymized frames, relative to the share it finds in the original frames
(useful for downstream analytics such as counting people).
Writes benchmarks/results/temporal.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from benchmarks._common import VIDEOS, machine
from benchmarks._identity import cached_thresholds, identity_models
from vidanon import sidecar
from vidanon.align import warp_crop
from vidanon.config import load_settings
from vidanon.detect import make_detector
from vidanon.diffusion.models import load_model, template_points
from vidanon.identity import FaceEmbedder
from vidanon.media import read_frames
from vidanon.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "temporal.json"
DEFAULT_VIDEOS = [ROOT / "samples" / "crowd.mp4", VIDEOS / "head_motion_a.mp4",
                  VIDEOS / "walking_single_person_608x1080.mp4"]


def track_crops(video: Path, track: dict, size: int) -> list[np.ndarray]:
    by_frame = {r["f"]: np.asarray(r["m"]).reshape(2, 3) for r in track["frames"]
                if r["mode"] == "diffusion"}
    return [warp_crop(f.image, by_frame[f.index], size) for f in read_frames(video)
            if f.index in by_frame]


def mean_pairwise(e: np.ndarray) -> float:
    """Mean cosine over all pairs of different rows of unit embeddings ``e``."""
    n = len(e)
    return float(((e @ e.T).sum() - n) / max(n * (n - 1), 1))


def consistency(emb: FaceEmbedder, crops: list[np.ndarray], pts: np.ndarray) -> float:
    return mean_pairwise(np.stack([emb(c, pts) for c in crops[:: max(1, len(crops) // 12)]]))


def dlib_consistency(dl, spec, orig: list[np.ndarray], anon: list[np.ndarray],
                     ) -> tuple[float, float]:
    """The same pairwise consistency with the second recogniser (dlib ResNet), landmarks
    from each original crop for both (``benchmarks.anchor``'s way); frames as MobileFaceNet's."""
    from vidanon.align import to_tensor_batch

    step = max(1, len(orig) // 12)
    o, a = to_tensor_batch(orig[::step]), to_tensor_batch(anon[::step])
    shapes = dl.prepare(o)
    return mean_pairwise(dl.embed(o, shapes)), mean_pairwise(dl.embed(a, shapes))


def flicker(crops: list[np.ndarray]) -> float:
    if len(crops) < 2:
        return 0.0
    return float(np.mean([np.abs(a.astype(np.float32) - b).mean()
                          for a, b in zip(crops, crops[1:])]))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004, 11-px Gaussian window, sigma 1.5) per pixel, on grey levels."""
    a = cv2.cvtColor(a, cv2.COLOR_BGR2GRAY).astype(np.float64)
    b = cv2.cvtColor(b, cv2.COLOR_BGR2GRAY).astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return cv2.GaussianBlur(x, (11, 11), 1.5)

    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))


def utility(original: Path, anonymized: Path, doc: dict, spec, every: int = 3) -> dict:
    """PSNR/SSIM outside every face's crop square over all frames; detector re-find rate on
    every ``every``-th. The replaced region is traced per face (FaceMesh, sealed under the
    track key) and may reach past the model's oval, so "outside the faces" is outside the
    whole aligned crop: nothing there may change."""
    alpha = np.ones((spec.crop_size, spec.crop_size), np.float32)
    faces: dict[int, list[np.ndarray]] = {}
    replaced: dict[int, list[np.ndarray]] = {}  # the detector re-find rate: diffusion only
    for tr in doc["tracks"]:
        for r in tr["frames"]:
            m = np.asarray(r["m"]).reshape(2, 3)
            faces.setdefault(r["f"], []).append(m)  # blurred faces are not background either
            if r["mode"] == "diffusion":
                replaced.setdefault(r["f"], []).append(m)
    det = make_detector(score_threshold=doc["settings"]["detect"]["score_threshold"])
    centre = np.array([spec.crop_size / 2, spec.crop_size / 2, 1.0])
    sq, n_px, ssim_sum, found = 0.0, 0, 0.0, {"original": 0, "anonymized": 0}
    checked = 0
    for fo, fa in zip(read_frames(original), read_frames(anonymized), strict=True):
        h, w = fo.image.shape[:2]
        face = np.zeros((h, w), np.float32)
        for m in faces.get(fo.index, []):
            face = np.maximum(face, cv2.warpAffine(alpha, m, (w, h), flags=cv2.WARP_INVERSE_MAP))
        keep = face <= 0
        d = fo.image.astype(np.float64) - fa.image
        sq += float((d[keep] ** 2).sum())
        n_px += int(keep.sum()) * 3
        ssim_sum += float(ssim_map(fo.image, fa.image)[keep].sum())
        if fo.index % every or fo.index not in replaced:
            continue
        for name, img in (("original", fo.image), ("anonymized", fa.image)):
            boxes = det(img).xyxy
            for m in replaced[fo.index]:
                cx, cy = cv2.invertAffineTransform(m) @ centre
                found[name] += bool(((boxes[:, 0] <= cx) & (cx <= boxes[:, 2])
                                     & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])).any())
        checked += len(replaced[fo.index])
    mse = sq / max(n_px, 1)
    return {
        "background_psnr_db": round(float(10 * np.log10(255.0**2 / max(mse, 1e-12))), 2),
        "background_ssim": round(ssim_sum / max(n_px / 3, 1), 4),
        "faces_checked": checked,
        "detected_original": round(found["original"] / max(checked, 1), 3),
        "detected_anonymized": round(found["anonymized"] / max(checked, 1), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", type=Path, action="append", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a setting for this run, e.g. diffusion.temperature=0.8")
    ap.add_argument("--model", default=None)
    ap.add_argument("--min-frames", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    videos = [v for v in (a.video or DEFAULT_VIDEOS) if v.exists()]
    spec = load_model(a.model).spec
    emb = FaceEmbedder()
    pts = template_points(spec)
    dl = next((m for m in identity_models(spec) if m.name != "MobileFaceNet"), None)
    per_video, used = [], {}
    for video in videos:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            res = run(video, Path(tmp) / "anon.mp4", Path(tmp) / "ring.json",
                      load_settings(a.config, a.overrides), a.model, quiet=True)
            doc = sidecar.read(res.sidecar)
            used = doc["settings"]["diffusion"]
            for tr in doc["tracks"]:
                if len(tr["frames"]) < a.min_frames:
                    continue
                if not any(r["mode"] == "diffusion" for r in tr["frames"]):
                    continue  # blurred whole (privacy guard, or too small): no pseudo-identity
                orig = track_crops(video, tr, spec.crop_size)
                anon = track_crops(res.output, tr, spec.crop_size)
                replaced = sum(r["mode"] == "diffusion" for r in tr["frames"])
                d = dlib_consistency(dl, spec, orig, anon) if dl is not None else (None, None)
                rows.append({
                    "id_consistency_dlib_original": d[0] and round(d[0], 3),
                    "id_consistency_dlib_anonymized": d[1] and round(d[1], 3),
                    "track": tr["id"], "frames": len(tr["frames"]),
                    "id_consistency_original": round(consistency(emb, orig, pts), 3),
                    "id_consistency_anonymized": round(consistency(emb, anon, pts), 3),
                    "flicker_original": round(flicker(orig), 2),
                    "flicker_anonymized": round(flicker(anon), 2),
                    "coverage_of_detected": round(replaced / max(tr["detected_frames"], 1), 3),
                })
            per_video.append({"video": video.name, "frames": doc["input"]["frames"],
                              "tracks_total": len(doc["tracks"]), "tracks": rows,
                              "utility": utility(video, res.output, doc, spec)})
    result = {"machine": machine(), "model": spec.name, "config": a.config or "default",
              "impostor_mean": {k: v["impostor_mean"] for k, v in cached_thresholds().items()},
              "overrides": a.overrides, "settings": used,
              "videos": per_video}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    a.out.with_suffix(".md").write_text(markdown(result, a.min_frames))
    print(markdown(result, a.min_frames))
    return result


def markdown(r: dict, min_frames: int) -> str:
    md = ["## Temporal consistency and utility", "",
          f"`python -m benchmarks.temporal --config {r['config']}`, model `{r['model']}`, "
          f"commit `{r['machine']['commit']}`"
          + "".join(f", {k} {r.get('settings', {}).get(k)}" for k in ("temperature", "anchor")
                    if k in r.get("settings", {}))
          + f". Per track with ≥ {min_frames} frames: mean "
          "identity cosine (MobileFaceNet, and dlib ResNet where installed) between the "
          "track's faces at different frames "
          "(original vs anonymized: a consistent pseudo-identity keeps it high), flicker (mean "
          "absolute change between consecutive aligned crops, 0-255), and coverage (replaced / "
          "detected frames; > 1 where gap filling and padding add frames; < 1 would be a leak).",
          ""]
    chance = r.get("impostor_mean", {})
    ratios: dict[str, list[float]] = {"MobileFaceNet": [], "dlib ResNet": []}
    above: dict[str, list[float]] = {"MobileFaceNet": [], "dlib ResNet": []}
    for v in r["videos"]:
        for t in v["tracks"]:
            for name, key in (("MobileFaceNet", "id_consistency"),
                              ("dlib ResNet", "id_consistency_dlib")):
                o, a = t.get(f"{key}_original"), t.get(f"{key}_anonymized")
                if not o:
                    continue
                ratios[name].append(a / o)
                if name in chance:  # both over the cosine of two unrelated faces
                    above[name].append((a - chance[name]) / max(o - chance[name], 1e-9))
    md += ["Consistency of the anonymized tracks over the original's, mean over tracks "
           "(target ≥ 0.9x): " + "; ".join(
               f"{k} **{np.mean(v):.2f}x**, above chance {np.mean(above[k]):.2f}x "
               f"({len(v)} tracks)" for k, v in ratios.items() if v) + ". *Above chance*: "
           "both cosines less the mean cosine of two unrelated faces ("
           + ", ".join(f"{k} {m}" for k, m in chance.items()) + "), which is high for dlib.",
           ""]
    for v in r["videos"]:
        u = v["utility"]
        md += [f"### {v['video']} ({v['frames']} frames, {v['tracks_total']} tracks)", "",
               f"Outside the face crops: PSNR **{u['background_psnr_db']} dB**, SSIM "
               f"**{u['background_ssim']}**. Detector still finds "
               f"**{100 * u['detected_anonymized']:.1f} %** of {u['faces_checked']} replaced "
               f"faces (every 3rd frame) vs {100 * u['detected_original']:.1f} % in the "
               "original frames.", "",
               "| track | frames | id consistency orig | id consistency anon | "
               "dlib orig | dlib anon | flicker orig | "
               "flicker anon | coverage |", "|---|---|---|---|---|---|---|---|---|"]
        for t in v["tracks"]:
            md.append(f"| {t['track']} | {t['frames']} | {t['id_consistency_original']} | "
                      f"{t['id_consistency_anonymized']} | "
                      f"{t.get('id_consistency_dlib_original')} | "
                      f"{t.get('id_consistency_dlib_anonymized')} | {t['flicker_original']} | "
                      f"{t['flicker_anonymized']} | {t['coverage_of_detected']} |")
        md.append("")
    return "\n".join(md)


if __name__ == "__main__":
    main()
