"""Same-person thresholds at FAR 0.1 % for faces of a given size in the frame.

A face 10 px between the eyes, cut from a frame and upscaled to a 128-px crop, is a blur:
two *different* people's crops at that size look alike to a recogniser, so the cosine that
only 0.1 % of impostor pairs reach is higher than on sharp faces. The privacy guard and the
leak benchmark judge a face at the threshold of its own size: the sharp threshold would call
small faces "still the same person" when impostor pairs of that size score just as high.

Each of 1,000 adult UTKFace faces (the set of ``_identity.thresholds``) is shrunk so that its
eyes are ``e`` px apart (INTER_AREA: a camera integrates light over a pixel) and cut back to a
128-px crop with the pipeline's own bicubic warp; the threshold is the 99.9th percentile of
cosines over the ~500k pairs of different faces. dlib's landmarks come from the sharp face, so
the recogniser is asked about identity, not about finding a face.

    python -m benchmarks.thresholds [--no-dlib]   # ~4 CPU-min MobileFaceNet, +4 per size dlib
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np

from benchmarks._common import ROOT, md_table, set_threads, write_results
from benchmarks._identity import UTK_SPEC, DlibId, MobileFaceNetId, adult_faces, as_tensor

EYE_PX = (6, 8, 10, 12, 16, 20, 24, 32, 40)
RESULTS = ROOT / "benchmarks" / "results" / "thresholds.json"


def by_size(recogniser: str, results: dict | None = None):
    """``eye_px -> threshold`` for ``recogniser`` from this benchmark's results: linear in
    between the measured sizes, the sharp threshold from the template's eye distance on (as
    ``vidanon.guard.threshold_at`` does for the guard's table)."""
    res = results or json.loads(RESULTS.read_text())
    rows = res["thresholds"][recogniser]
    sizes = [float(k) for k in rows if k != "sharp"] + [float(res["template_eye_px"])]
    values = [float(v) for k, v in rows.items() if k != "sharp"] + [float(rows["sharp"])]
    order = np.argsort(sizes)
    xs, ys = np.asarray(sizes)[order], np.asarray(values)[order]
    return lambda eye_px: float(np.interp(eye_px, xs, ys))


def degrade(faces: np.ndarray, eye_px: float, template_eye_px: float) -> np.ndarray:
    """128-px crops as they come out of a frame where the eyes are ``eye_px`` apart."""
    s = min(1.0, eye_px / template_eye_px)
    n = faces.shape[1]
    small = max(4, round(n * s))
    out = np.empty_like(faces)
    for i, f in enumerate(faces):
        lo = cv2.resize(f, (small, small), interpolation=cv2.INTER_AREA)
        out[i] = cv2.resize(lo, (n, n), interpolation=cv2.INTER_CUBIC)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--dup", type=float, default=0.9,
                    help="drop pairs MobileFaceNet scores >= this on sharp faces (same photo)")
    ap.add_argument("--no-dlib", action="store_true",
                    help="MobileFaceNet only (the guard's recogniser; dlib takes ~4 min a size)")
    a = ap.parse_args()
    set_threads(1)
    faces = adult_faces(a.n)
    template_eye = UTK_SPEC.eye_px
    recs = [MobileFaceNetId(UTK_SPEC)] + ([] if a.no_dlib else [DlibId(UTK_SPEC)])
    sharp = as_tensor(faces)
    ctx = {r.name: r.prepare(sharp) for r in recs}
    iu = np.triu_indices(len(faces), 1)
    sharp_mfn = recs[0].embed(sharp)
    keep = (sharp_mfn @ sharp_mfn.T)[iu] < a.dup
    rows: dict[str, dict[str, float]] = {r.name: {} for r in recs}
    for e in (*EYE_PX, template_eye):
        x = as_tensor(degrade(faces, e, template_eye))
        key = "sharp" if e == template_eye else str(e)
        for r in recs:
            c = ctx[r.name]
            emb = np.concatenate([r.embed(x[i:i + 64], None if c is None else c[i:i + 64])
                                  for i in range(0, len(x), 64)])
            rows[r.name][key] = round(float(np.quantile((emb @ emb.T)[iu][keep], 0.999)), 4)
        print(f"eye {e:5.1f} px: " + ", ".join(f"{r.name} {rows[r.name][key]}" for r in recs),
              flush=True)
    res = {"faces": len(faces), "impostor_pairs": int(keep.sum()),
           "template_eye_px": round(template_eye, 1), "far": 0.001, "thresholds": rows,
           "source": f"{len(faces)} adult UTKFace faces, shrunk to the eye distance and cut "
                     "back to 128 px (INTER_AREA down, bicubic up)"}
    keys = [*map(str, EYE_PX), "sharp"]
    md = ("Cosine at FAR 0.1 % by eye distance in the frame; " + res["source"] + f", "
          f"{res['impostor_pairs']:,} impostor pairs.\n\n"
          + md_table(["eye px", *(r.name for r in recs)],
                     [[k, *(rows[r.name][k] for r in recs)] for k in keys]))
    write_results("thresholds", res, md)
    print(md)

if __name__ == "__main__":
    main()
