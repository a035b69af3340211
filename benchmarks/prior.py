"""Does the face prior generate faces? Detector hit rate on unconditional samples.

    python -m benchmarks.prior [--n 256] [--steps 50] [--model FOLDER]

Draws ``n`` deterministic DDIM samples from pure noise and counts those in which the
pipeline's own detector (YuNet, padded and upscaled exactly as for the template measurement)
finds exactly one face. The same count on ``n`` held-out real faces at the model's
resolution is the ceiling. Writes benchmarks/results/prior.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks._common import machine, write_results
from benchmarks._identity import UTK_TEMPLATE, MobileFaceNetId, cached_thresholds
from benchmarks.quality import FACES
from vidanon.diffusion.models import BUNDLED_DIR, ModelSpec, load_model
from vidanon.prior.data import load_dataset, split_indices
from vidanon.prior.sample import sample_faces, save_png, tile
from vidanon.prior.template import detect_landmarks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "prior.json"
GRID = ROOT / "docs" / "prior_samples.png"
DETECT_PX = 128  # YuNet needs more than 64 px; the template was measured at 128 px too


def face_rate(faces_rgb: np.ndarray) -> float:
    big = np.stack([cv2.resize(f, (DETECT_PX, DETECT_PX), interpolation=cv2.INTER_CUBIC)
                    for f in faces_rgb])
    found = ~np.isnan(detect_landmarks(big)).any(axis=(1, 2))
    return float(found.mean())


def memorisation(samples: np.ndarray, train_rgb: np.ndarray, size: int) -> dict:
    """Nearest training face of each sample by MobileFaceNet cosine, against the same-person
    threshold at FAR 0.1 % on sharp faces: a sample at or above it copies a training person."""
    spec = ModelSpec("utk", "pixel", size, (3, size, size), UTK_TEMPLATE, [0.5, 0.5, 0.4, 0.45])
    mfn = MobileFaceNetId(spec)

    def emb(rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(rgb.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
        return np.concatenate([mfn.embed(x[i:i + 256]) for i in range(0, len(x), 256)])

    thr = cached_thresholds()["MobileFaceNet"]["threshold"]
    nearest = (emb(samples) @ emb(train_rgb).T).max(axis=1)
    return {"threshold": thr, "training_faces": int(len(train_rgb)),
            "share_below_threshold": round(float((nearest < thr).mean()), 4),
            "max_nearest_cos": round(float(nearest.max()), 4),
            "median_nearest_cos": round(float(np.median(nearest)), 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    folder = a.model or BUNDLED_DIR
    spec = load_model(str(folder), device="cpu").spec
    t0 = time.time()
    samples = sample_faces(folder, n=a.n, steps=a.steps, seed=0)
    t_sample = time.time() - t0
    faces, names = load_dataset(FACES, spec.crop_size)
    train, held = split_indices(names)
    memo = memorisation(samples, faces[train], spec.crop_size)
    save_png(tile(samples[:64]), GRID)
    r = {
        "machine": machine(),
        "model": spec.name,
        "weights_sha256": spec.weights_sha256,
        "training_steps": spec.extra.get("training", {}).get("steps"),
        "samples": a.n,
        "ddim_steps": a.steps,
        "sample_face_rate": round(face_rate(samples), 4),
        "heldout_face_rate": round(face_rate(faces[held][: a.n]), 4),
        "sample_s_per_image_cpu": round(t_sample / a.n, 3),
        "memorisation": memo,
        "grid": str(GRID.relative_to(ROOT)),
    }
    write_results(a.out, r, markdown(r))
    print(markdown(r))
    return r


def markdown(r: dict) -> str:
    return "\n".join([
        "## Face prior: are its samples faces?",
        "",
        f"`python -m benchmarks.prior`: {r['samples']} unconditional DDIM samples "
        f"({r['ddim_steps']} steps, eta 0) from `{r['model']}` (weights "
        f"`{r['weights_sha256'][:12]}`, {r['training_steps']} training steps); commit "
        f"`{r['machine']['commit']}`. A sample counts if YuNet finds exactly one face in it "
        f"(upscaled to {DETECT_PX} px, edge-padded). Target (#4): at least 90 %.",
        "",
        "| images | share with one detected face |",
        "|---|---|",
        f"| prior samples | {100 * r['sample_face_rate']:.1f} % |",
        f"| held-out real faces (ceiling) | {100 * r['heldout_face_rate']:.1f} % |",
        "",
        f"CPU time per sample: {r['sample_s_per_image_cpu']} s.",
        "",
        "No memorised people: for each sample, the most similar of the "
        f"{r['memorisation']['training_faces']:,} training faces (MobileFaceNet cosine); "
        f"**{100 * r['memorisation']['share_below_threshold']:.1f} %** of samples are below the "
        f"same-person threshold {r['memorisation']['threshold']} (FAR 0.1 %, sharp faces; "
        "target >= 99 %). Nearest-face cosine: median "
        f"{r['memorisation']['median_nearest_cos']}, max {r['memorisation']['max_nearest_cos']}.",
        "",
        "![the first 64 samples](prior_samples.png)",
        "",
    ])


if __name__ == "__main__":
    main()
