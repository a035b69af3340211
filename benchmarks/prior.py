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

from benchmarks._common import machine, write_results
from benchmarks.quality import FACES
from vidanon.diffusion.models import BUNDLED_DIR, load_model
from vidanon.prior.data import load_dataset, split_indices
from vidanon.prior.sample import sample_faces
from vidanon.prior.template import detect_landmarks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "prior.json"
DETECT_PX = 128  # YuNet needs more than 64 px; the template was measured at 128 px too


def face_rate(faces_rgb: np.ndarray) -> float:
    big = np.stack([cv2.resize(f, (DETECT_PX, DETECT_PX), interpolation=cv2.INTER_CUBIC)
                    for f in faces_rgb])
    found = ~np.isnan(detect_landmarks(big)).any(axis=(1, 2))
    return float(found.mean())


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
    _, held = split_indices(names)
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
    ])


if __name__ == "__main__":
    main()
