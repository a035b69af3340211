"""DDIM steps x temperature: is the replacement a face, is it still the person, and does it
come back from a face as small as video holds it?

    python -m benchmarks.noise_scale [--n 32] [--grid 4:1.0 6:0.8 ...] [--scales 1 0.5 0.35]

Why: at few DDIM steps the inverted noise of a real face is over-dispersed (its RMS inside
the face mask is measured here per step count), and the prior completes a face from
over-dispersed noise poorly; a temperature below 1 (``diffusion.temperature``) scales it back
but costs recovery a ``1 / tau`` gain on the re-encoding error. More steps lower the RMS at
CPU cost. Recovery also meets a second loss in video: a face smaller in the frame than the
model's 128-px crop is pasted down and cropped up again, so its finest detail is gone before
recovery re-encodes it. Each grid point anonymizes ``--n`` held-out faces (oval mask, random
keys) and reports: YuNet finds a face in the output, the anonymized face is matched to its
original (MobileFaceNet, FAR 0.1 % on sharp faces), and recovery TAR with the right key after
the crop has been pasted into a frame at each of ``--scales`` (frame pixels per crop pixel;
1.0 = the face is 128 px in the frame, 0.35 = eyes ~19 px apart) and cropped back. CPU
seconds per anonymized crop at one thread. Writes benchmarks/results/noise_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from benchmarks._common import machine, md_table, set_threads, write_results
from benchmarks._identity import cached_thresholds, face_rate, identity_models, to_uint8_rgb
from benchmarks.quality import heldout_set
from vidanon.align import (
    from_tensor_batch,
    oval_mask,
    paste,
    paste_alpha,
    to_tensor_batch,
    warp_crop,
)
from vidanon.diffusion.engine import Engine, EngineSettings, Inversions
from vidanon.diffusion.models import load_model


def frame_of(orig: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A frame where the face is ``scale`` times the crop's size (the original, resized, with
    a 4-px border) and its frame -> crop matrix."""
    size = orig.shape[0]
    side = max(8, int(round(size * scale)))
    frame = cv2.resize(orig, (side, side), interpolation=cv2.INTER_AREA)
    frame = cv2.copyMakeBorder(frame, 4, 4, 4, 4, cv2.BORDER_REPLICATE)
    s = side / size
    return frame, np.array([[1 / s, 0, -4 / s], [0, 1 / s, -4 / s]])


def through_frame(orig: np.ndarray, anon: np.ndarray, alpha: np.ndarray, scale: float,
                  ) -> np.ndarray:
    """Paste ``anon`` (a crop) into a frame where the face is ``scale`` times the crop's size
    (the original, resized, is the frame), then crop it back as recovery does."""
    frame, m = frame_of(orig, scale)
    paste(frame, anon, m, alpha)
    return warp_crop(frame, m, orig.shape[0])


def inverted_rms(eng: Engine, x: torch.Tensor, masks: torch.Tensor) -> float:
    """RMS of the inverted noise inside the mask (from the engine's memo: no second inversion)."""
    zT, _, m = eng._inverted(x, masks)
    inside = zT[m.expand_as(zT) > 0]
    return float(inside.pow(2).mean().sqrt())


def grid_point(model, x, masks, alpha, keys, steps: int, tau: float, scales, mf, e0,
               thr: float) -> dict:
    eng = Engine(model, EngineSettings(steps=steps, refine=4, tol=0.002, temperature=tau),
                 Inversions(max_bytes=1 << 30))
    t0 = time.process_time()
    anon = eng.anonymize(x, masks, keys)
    cpu = (time.process_time() - t0) / len(x)

    def tar(y: torch.Tensor) -> float:
        return round(float((np.sum(mf.embed(y) * e0, 1) >= thr).mean()), 4)

    row = {"steps": steps, "temperature": tau,
           "inverted_rms": round(inverted_rms(eng, x, masks), 3),
           "face_found": round(face_rate(to_uint8_rgb(anon)), 4),
           "anonymized_matched": tar(anon),
           "cpu_s_per_crop": round(cpu, 3), "recovered_tar": {}}
    orig_u8, anon_u8 = from_tensor_batch(x), from_tensor_batch(anon)
    for s in scales:
        crops = [through_frame(o, a, alpha, s) for o, a in zip(orig_u8, anon_u8)]
        rec = eng.recover(to_tensor_batch(crops), masks, keys)
        row["recovered_tar"][str(s)] = tar(rec)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.noise_scale")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--grid", nargs="+", default=["4:1.0", "4:0.8", "6:1.0", "6:0.9", "6:0.8",
                                                  "8:1.0", "8:0.85"])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.35])
    ap.add_argument("--model", default=None)
    a = ap.parse_args(argv)
    set_threads(1)
    model = load_model(a.model)
    spec = model.spec
    x, masks, keys = heldout_set(spec, a.n)
    alpha = paste_alpha(spec, 0.06, oval_mask(spec))
    mf = identity_models(spec)[0]
    thr = cached_thresholds()[mf.name]["threshold"]
    e0 = mf.embed(x)
    rows = []
    for point in a.grid:
        steps, tau = point.split(":")
        rows.append(grid_point(model, x, masks, alpha, keys, int(steps), float(tau), a.scales,
                               mf, e0, thr))
        print(rows[-1], flush=True)
    res = {"machine": machine(), "model": spec.name, "weights_sha256": spec.weights_sha256,
           "faces": len(x), "identity": mf.name, "threshold": thr, "scales": a.scales,
           "rows": rows}
    md = "\n".join([
        "## DDIM steps x temperature", "",
        f"`python -m benchmarks.noise_scale` ({len(x)} held-out faces, oval mask, "
        f"{mf.name} at FAR 0.1 % on sharp faces: {thr}). *Recovered* is TAR with the right "
        "key after the anonymized crop was pasted into a frame where the face is *scale* "
        "times the crop's 128 px (0.5: eyes ~27 px apart; 0.35: ~19 px) and cropped back; "
        "CPU s per anonymized crop at one thread.", "",
        md_table(["steps", "tau", "inverted RMS", "face found", "anonymized matched"]
                 + [f"recovered @ {s}" for s in a.scales] + ["CPU s/crop"],
                 [[r["steps"], r["temperature"], r["inverted_rms"],
                   f"{100 * r['face_found']:.1f} %", f"{100 * r['anonymized_matched']:.1f} %"]
                  + [f"{100 * r['recovered_tar'][str(s)]:.1f} %" for s in a.scales]
                  + [r["cpu_s_per_crop"]] for r in rows]), ""])
    write_results("noise_scale", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
