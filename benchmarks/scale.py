"""Throughput of ``vidanon run --ray`` against the number of local CPU workers (issue #14).

For each worker count a fresh local Ray instance with that many CPUs is started, the workers
load the bundled prior, and a cut of the shipped sample is anonymized at default settings
(privacy guard off, so every crop is rendered exactly once and crops/s is the diffusion
rate; the guard adds its re-render passes on top).  Timed: the rendering passes (units on
the workers, joining on the driver), and the whole run (with detection, planning and
publishing on the driver); plus the workers' own busy seconds per crop, which is the number
a cluster plan scales from (docs/scale.md).  The 2-core machine these sessions run on is
shared with a training job, so every row carries the load average.

    python -m benchmarks.scale [--frames 60] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, fmt_load, machine, md_table, timed, write_results

SAMPLE = ROOT / "samples" / "crowd.mp4"


def one(clip: Path, workers: int, segment: int) -> dict:
    import ray

    from vidanon import pipeline, scale
    from vidanon.config import load_settings

    settings = load_settings(None, ["guard.verify=false"])
    rec: dict = {"workers": workers, "segment_frames": segment}
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        t0 = time.perf_counter()
        pool = scale.WorkerPool(None, "cpu", workers)
        rec["start_s"] = round(time.perf_counter() - t0, 2)
        renderer = scale.RayRenderer(pool, segment)
        render_s = [0.0]
        original = renderer.render

        def timed_render(rp, guard, quiet):  # noqa: ANN001, ANN202
            t = time.perf_counter()
            try:
                return original(rp, guard, quiet)
            finally:
                render_s[0] += time.perf_counter() - t

        renderer.render = timed_render
        with tempfile.TemporaryDirectory() as d, timed(rec):
            res = pipeline.run(clip, Path(d) / "out.anon.mp4", Path(d) / "keys.json",
                               settings, device="cpu", quiet=True, renderer=renderer)
        s = pool.stats
        rec.update({
            "frames": s["frames"], "crops": s["crops"], "units": s["units"],
            "tracks": res.tracks, "render_s": round(render_s[0], 2),
            "frames_per_s": round(s["frames"] / render_s[0], 3),
            "crops_per_s": round(s["crops"] / render_s[0], 3),
            "worker_busy_s": round(s["worker_s"], 2),
            "worker_s_per_crop": round(s["worker_s"] / max(s["crops"], 1), 3),
            "max_in_flight": pool.max_in_flight,
        })
        pool.shutdown()
    finally:
        ray.shutdown()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--segment-frames", type=int, default=6)
    a = ap.parse_args()
    from vidanon.media import cut

    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        clip = SAMPLE
        if a.frames < 60:
            clip = Path(d) / f"crowd{a.frames}.mp4"
            cut(SAMPLE, clip, 0.0, a.frames / 29.97)
        for w in a.workers:
            rec = one(clip, w, a.segment_frames)
            print(rec)
            rows.append(rec)
    base = rows[0]["frames_per_s"] / rows[0]["workers"]
    table = md_table(
        ["workers", "units", "frames", "crops", "render s", "frames/s", "crops/s",
         "speed-up", "worker CPU-s per crop", "whole run s", "load 1-min before/after"],
        [[r["workers"], r["units"], r["frames"], r["crops"], r["render_s"], r["frames_per_s"],
          r["crops_per_s"], f"{r['frames_per_s'] / base:.2f}x", r["worker_s_per_crop"],
          f"{r['seconds']:.1f}", fmt_load(r)] for r in rows])
    md = "\n".join([
        "## Scale-out on Ray (local CPU workers)", "",
        f"`python -m benchmarks.scale`: the first {a.frames} frames of `samples/crowd.mp4`, "
        "bundled prior, default settings with the privacy guard off (each crop rendered "
        f"once), units of about {a.segment_frames} frames, one torch thread per worker, a "
        "fresh local Ray instance per row. *Render s* covers the rendering pass (workers + "
        "joining on the driver); *whole run* adds detection, planning, the sidecar and "
        "publishing on the driver. CPU only; no GPU was measured.", "",
        table, "",
        f"Machine: {info['cpu']}, {info['nproc']} cores, shared with a training job at nice "
        "-10 (see the load column): two workers compete with it for the second core, so the "
        "speed-up here is a floor, not what a dedicated node gives. Outputs are identical "
        "for any worker count and segment size (tests/test_ray.py).",
    ])
    write_results("scale", {"rows": rows, "frames": a.frames, "machine": info}, md)


if __name__ == "__main__":
    main()
