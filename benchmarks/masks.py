"""Why face masks are sealed in the sidecar instead of re-traced at recovery.

    python -m benchmarks.masks OUTPUT.anon.mp4 --keyring KEYS.json

Recovery must use exactly the mask anonymization used. The alternative to storing it is to
derive it from what recovery has: the anonymized video. For every replaced face-frame this
traces FaceMesh on the *anonymized* crop and compares that region with the one anonymization
used (unsealed with the track key): intersection over union, and the share of mask pixels
that differ. It also reports what storing costs: sealed bytes per face-frame.
Writes ``benchmarks/results/masks.{json,md}``.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np

from benchmarks._common import md_table, write_results
from vidanon import sidecar
from vidanon.align import warp_crop
from vidanon.diffusion.models import load_model
from vidanon.keys import Keyring, track_key
from vidanon.masks import FaceMasks
from vidanon.media import read_frames
from vidanon.pipeline import recovery_masks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.masks", description=__doc__)
    ap.add_argument("video", type=Path)
    ap.add_argument("--keyring", type=Path, required=True)
    a = ap.parse_args(argv)
    doc = sidecar.read(sidecar.sidecar_path(a.video))
    spec = load_model(doc["model"]["name"], device="cpu").spec
    master = Keyring.open(a.keyring).master(doc["job_id"])
    keys = {tr["id"]: track_key(master, doc["job_id"], tr.get("key_track", tr["id"]),
                                tr.get("key_epoch", 0)) for tr in doc["tracks"]}
    stored = recovery_masks(doc, spec, keys)
    traced = FaceMasks(spec, stored.preset, stored.feather)
    jobs: dict[int, list] = {}
    sealed_bytes, faces = 0, 0
    for tr in doc["tracks"]:
        if tr.get("mask"):
            sealed_bytes += len(base64.b64decode(tr["mask"]["data"]))
        for rec in tr["frames"]:
            if rec["mode"] == "diffusion":
                faces += 1
                jobs.setdefault(rec["f"], []).append(
                    (tr["id"], np.asarray(rec["m"]).reshape(2, 3), tr.get("mask_grow", 1.0)))
    ious, diffs = [], []
    for frame in read_frames(a.video):
        for tid, m, grow in jobs.get(frame.index, []):
            crop = warp_crop(frame.image, m, spec.crop_size)
            used = stored.get(tid, frame.index, None, grow)[0] > 0
            again = traced.get(tid, frame.index, crop, grow)[0] > 0
            ious.append((used & again).sum() / max((used | again).sum(), 1))
            diffs.append((used ^ again).sum() / max(used.sum(), 1))
    found, missed = traced.traced
    res = {"video": a.video.name, "preset": stored.preset, "face_frames": faces,
           "facemesh_found_on_anonymized": found, "facemesh_missed_on_anonymized": missed,
           "iou_median": round(float(np.median(ious)), 4), "iou_min": round(float(np.min(ious)), 4),
           "differing_pixels_median_pct": round(100 * float(np.median(diffs)), 2),
           "differing_pixels_max_pct": round(100 * float(np.max(diffs)), 2),
           "sealed_bytes_per_face_frame": round(sealed_bytes / max(faces, 1), 1)}
    print(json.dumps(res, indent=1))
    md = ("## Face masks: sealed vs re-traced at recovery\n\n"
          f"`{res['video']}`, preset `{res['preset']}`, {faces} replaced face-frames. FaceMesh "
          "traced again on the anonymized crops, against the region anonymization used:\n\n"
          + md_table(["FaceMesh finds a face", "IoU median / min",
                      "pixels that differ, median / max", "sealed bytes per face-frame"],
                     [[f"{found} of {found + missed}",
                       f"{res['iou_median']} / {res['iou_min']}",
                       f"{res['differing_pixels_median_pct']} % / "
                       f"{res['differing_pixels_max_pct']} %",
                       res["sealed_bytes_per_face_frame"]]]) + "\n")
    write_results("masks", res, md)


if __name__ == "__main__":
    main()
