"""Temperature and anchor: how steady, how private, how recoverable (a grid, in memory).

    python -m benchmarks.anchor [--n 32] [--frames 12] [--tau 1.0 0.8 0.7] [--w 0 0.25 0.5]

The engine maps a face's inverted noise ``z`` to ``a * flip(z) + b * n`` (``n`` drawn from the
track key, the same in every frame; ``a = tau * sqrt(1 - w)``, ``b = tau * sqrt(w)``). For
each (tau, w):

* *steadiness*: the longest track of each of the shared single-person clips, ``frames``
  frames spread over it, anonymized with one key. Identity consistency is the mean pairwise
  cosine between the track's faces (as in benchmarks.temporal); the ratio is anonymized over
  original (target 0.9x).
* *privacy and recovery*: ``n`` held-out UTKFace faces (one key each), as in
  benchmarks.quality: anonymized faces matched to their original, faces recovered with the
  right key from the 8-bit anonymized crop (TAR), at FAR 0.1 % for sharp 128-px faces, and
  the share of anonymized faces in which YuNet finds a face.

Crops are aligned as the pipeline aligns them and masked by the model's face oval. The
inversion of an original does not depend on the key or on (tau, w), so one memo serves the
whole grid and a cell costs the recovery inversions only. Writes
benchmarks/results/anchor.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import VIDEOS, machine, write_results
from benchmarks._identity import cached_thresholds, face_rate, identity_models, to_uint8_rgb
from benchmarks.quality import heldout_faces, references
from benchmarks.temporal import mean_pairwise
from vidanon.align import crop_transform, oval_mask, to_tensor_batch, warp_crop
from vidanon.config import load_settings
from vidanon.diffusion.engine import Engine, Inversions
from vidanon.diffusion.models import ModelSpec, load_model
from vidanon.keys import Key
from vidanon.media import probe, read_frames
from vidanon.passes import engine_settings
from vidanon.pipeline import detect_and_track

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "anchor.json"
CLIPS = ["head_motion_a.mp4", "head_motion_b.mp4", "talking_head_512.mp4"]


def track_faces(spec: ModelSpec, settings: dict, frames: int) -> dict[str, torch.Tensor]:
    """Aligned crops of ``frames`` frames spread over each clip's longest track."""
    out = {}
    for name in CLIPS:
        clip = VIDEOS / name
        if not clip.exists():
            continue
        tracks = detect_and_track(clip, probe(clip), settings, quiet=True)
        tr = max(tracks, key=lambda t: len(t.detected))
        seen = sorted(tr.detected)
        want = set(seen[:: max(1, len(seen) // frames)][:frames])
        crops = [warp_crop(f.image, crop_transform(tr.landmarks[f.index], spec), spec.crop_size)
                 for f in read_frames(clip) if f.index in want]
        out[clip.stem] = to_tensor_batch(crops)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32, help="held-out faces")
    ap.add_argument("--frames", type=int, default=12, help="frames per track")
    ap.add_argument("--tau", type=float, nargs="+", default=[1.0, 0.8, 0.7])
    ap.add_argument("--w", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument("--config", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    settings = load_settings(a.config)
    model = load_model(settings.get("model"), device="cpu")
    spec = model.spec
    ids = identity_models(spec)
    thr = {k: v["threshold"] for k, v in cached_thresholds().items()}
    x = heldout_faces(spec)[: a.n]
    refs = references(ids, x)
    tracks = track_faces(spec, settings, a.frames)
    track_refs = {k: references(ids, v) for k, v in tracks.items()}
    oval = torch.from_numpy(oval_mask(spec))[None, None]
    m = oval.repeat(len(x), 1, 1, 1)
    rng = np.random.default_rng(0)
    keys = [Key(rng.bytes(16)) for _ in range(a.n)]
    track_key = Key(rng.bytes(16))
    memo = Inversions(max_bytes=1 << 30)

    def consistency(name: str, crops: torch.Tensor) -> dict:
        return {idm.name: mean_pairwise(idm.embed(crops, track_refs[name][idm.name][0]))
                for idm in ids}

    original = {k: consistency(k, v) for k, v in tracks.items()}
    cells = []
    for tau in a.tau:
        for w in a.w:
            t0 = time.time()
            eng = Engine(model, engine_settings(model, load_settings(a.config, [
                f"diffusion.temperature={tau}", f"diffusion.anchor={w}"])), memo)
            anon = eng.anonymize(x, m, keys)
            quant = torch.round((anon + 1) * 127.5) / 127.5 - 1
            rec = eng.recover(quant, m, keys)
            cell: dict = {"tau": tau, "w": w, "a": round(eng.mix[0], 4),
                          "face_found": round(face_rate(to_uint8_rgb(anon)), 4)}
            for idm in ids:
                ctx, e0 = refs[idm.name]
                for cond, y in (("anonymized", anon), ("recovered", rec)):
                    cos = np.sum(idm.embed(y, ctx) * e0, axis=1)
                    cell[f"{cond}_above_{idm.name}"] = round(float((cos >= thr[idm.name]).mean()),
                                                             4)
            steady = {}
            for name, crops in tracks.items():
                an = eng.anonymize(crops, oval.repeat(len(crops), 1, 1, 1),
                                   [track_key] * len(crops))
                c = consistency(name, an)
                steady[name] = {idm.name: {"original": round(original[name][idm.name], 3),
                                           "anonymized": round(c[idm.name], 3),
                                           "ratio": round(c[idm.name] / original[name][idm.name],
                                                          3)} for idm in ids}
            cell["steadiness"] = steady
            cell["mean_ratio"] = {idm.name: round(float(np.mean(
                [s[idm.name]["ratio"] for s in steady.values()])), 3) for idm in ids}
            cell["seconds"] = round(time.time() - t0, 1)
            print(cell, flush=True)
            cells.append(cell)
    r = {"machine": machine(), "model": spec.name, "weights_sha256": spec.weights_sha256,
         "faces": a.n, "frames_per_track": a.frames, "tracks": list(tracks),
         "thresholds_far_0.1pct": thr, "cells": cells}
    write_results(a.out, r, markdown(r))
    print(markdown(r))
    return r


def markdown(r: dict) -> str:
    names = list(r["thresholds_far_0.1pct"])
    head = ("| tau | w | a (1/a: recovery's error gain) | face found | "
            + " | ".join(f"anonymized matched ({n}) | recovered TAR ({n}) | steadiness ({n})"
                         for n in names) + " |")
    lines = [
        "## Temperature and anchor",
        "",
        f"`python -m benchmarks.anchor`: model `{r['model']}` (weights "
        f"`{r['weights_sha256'][:12]}`), commit `{r['machine']['commit']}`, "
        f"{r['machine']['cpu']}. Inside the face mask the engine writes "
        "`a * flip(z) + b * n`, `a = tau * sqrt(1 - w)`, `b = tau * sqrt(w)`, `n` drawn from "
        f"the track key. {r['faces']} held-out UTKFace faces (one key each; recovery from the "
        "8-bit anonymized crop) at FAR 0.1 % for sharp 128-px faces; *steadiness* = identity "
        "consistency within a track, anonymized over original (mean pairwise cosine of "
        f"{r['frames_per_track']} frames of the longest track; mean over "
        f"{', '.join(r['tracks'])}; target 0.9x). Face oval masks.",
        "",
        head,
        "|---" * (4 + 3 * len(names)) + "|",
    ]
    for c in r["cells"]:
        cells = " | ".join(f"{100 * c[f'anonymized_above_{n}']:.1f} % | "
                           f"{100 * c[f'recovered_above_{n}']:.1f} % | "
                           f"{c['mean_ratio'][n]:.2f}x" for n in names)
        lines.append(f"| {c['tau']} | {c['w']} | {c['a']} | {100 * c['face_found']:.1f} % | "
                     f"{cells} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
