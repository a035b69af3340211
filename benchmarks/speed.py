"""CPU speed, memory flatness and the compute budget of a CelebA-HQ-sized model.

    python -m benchmarks.speed [--skip engine,pipeline,memory,flops]

(a) Engine alone: the UNet call is what costs, so one batched UNet call is timed per (model,
    batch), and the transform time is extrapolated with the mean UNet calls per crop that a
    real ``Engine.anonymize`` of held-out faces spends at 6, 20 and 50 steps (the inversion
    stops at a tolerance, so that count is measured, not fixed); share of a matmul's GFLOP/s.
(b) Whole pipeline on samples/crowd.mp4 in a child process: decode only, detect+track, and
    the full ``vidanon.pipeline.run`` (engine time inside it measured by wrapping
    ``Engine.anonymize``), with the child's peak RSS.
(c) Memory flatness: peak RSS of read_frames + detect_and_track over the first 100 and 300
    frames of a 608x1080 clip, each in its own child process.
(d) CompVis/ldm-celebahq-256-shaped model (random weights): parameters, FLOP per UNet call
    and per VQ encode/decode with torch's FlopCounterMode at batch 1, one timed CPU UNet call,
    and the compute-limited crops/s on an H100 at the measured calls per crop.

Writes benchmarks/results/speed.json and speed.md.  Every timing carries nproc and the
1-minute load average before/after it: this machine is shared, so they are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import (
    ROOT,
    VIDEOS,
    fmt_load,
    load,
    machine,
    md_table,
    set_threads,
    timed,
    write_results,
)

H100_FP16_DENSE_TFLOPS = 790.0  # dense fp16/bf16 tensor-core peak, FLOP = 2 per multiply-add
CROWD = ROOT / "samples" / "crowd.mp4"
WALKING = VIDEOS / "walking_single_person_608x1080.mp4"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _model(name: str):
    from vidanon.diffusion.models import load_model

    return load_model(None if name == "bundled" else name, device="cpu")


# -- (a) engine ------------------------------------------------------------------------------


def time_unet_call(model, batch: int, reps: int = 3) -> dict:
    c, h, w = model.spec.latent_shape
    z = torch.randn(batch, c, h, w)
    with torch.no_grad():
        model.eps(z, 500)  # warm-up
        rec: dict = {"batch": batch, "reps": reps}
        times = []
        with timed(rec):
            for _ in range(reps):
                t0 = time.perf_counter()
                model.eps(z, 500)
                times.append(time.perf_counter() - t0)
    rec["s_per_call"] = statistics.median(times)
    rec["all_s"] = [round(t, 4) for t in times]
    return rec


BATCHES = {"tiny-pixel": (8, 32), "bundled": (8, 32), "celebahq": (1, 2)}
STEP_COUNTS = (6, 20, 50)


def cpu_matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """Practical fp32 peak of this core: a large matmul, the best a UNet could approach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def measured_calls(steps_list=STEP_COUNTS, n: int = 8) -> dict[int, float]:
    """Mean UNet calls per crop of the default settings (tol-stopped inversion) on held-out
    faces with the bundled prior; the call count depends on the model, so other models'
    rows use these as an estimate."""
    from benchmarks.quality import heldout_faces
    from vidanon.align import oval_mask
    from vidanon.config import load_settings
    from vidanon.diffusion.engine import Engine
    from vidanon.keys import Key
    from vidanon.passes import engine_settings

    model = _model("bundled")
    base = engine_settings(model, load_settings())
    x = heldout_faces(model.spec)[:n]
    m = torch.from_numpy(oval_mask(model.spec))[None, None].repeat(n, 1, 1, 1)
    keys = [Key(np.random.default_rng(i).bytes(16)) for i in range(n)]
    out = {}
    for steps in steps_list:
        eng = Engine(model, dataclasses.replace(base, steps=steps, batch_size=n))
        eng.anonymize(x, m, keys)
        out[steps] = eng.mean_unet_calls_per_crop
        print(f"  bundled, {steps} steps: {out[steps]:.1f} UNet calls per crop", flush=True)
    return out


def bench_engine(models: list[str]) -> dict:
    from vidanon.diffusion.models import celebahq_shaped

    peak = cpu_matmul_gflops()
    calls_per_crop = measured_calls()
    out: dict = {"models": {}, "cpu_matmul_gflops": peak, "calls_per_crop": calls_per_crop}
    for name in models:
        model = celebahq_shaped() if name == "celebahq" else _model(name)
        spec = model.spec
        c, h, w = spec.latent_shape
        flop, _ = count_flops(lambda m=model, c=c, h=h, w=w: m.eps(torch.randn(1, c, h, w), 500))
        calls = {}
        for batch in BATCHES[name]:
            calls[batch] = time_unet_call(model, batch, reps=3 if name != "celebahq" else 1)
            calls[batch]["gflops_achieved"] = flop * batch / calls[batch]["s_per_call"] / 1e9
            print(f"  {name} batch {batch}: {1000 * calls[batch]['s_per_call']:.1f} ms/call "
                  f"load {load()}", flush=True)
        grid = []
        for steps, batch in itertools.product(STEP_COUNTS, BATCHES[name]):
            n_calls = calls_per_crop[steps]
            s_call = calls[batch]["s_per_call"]
            s_crop = n_calls * s_call / batch
            grid.append({"steps": steps, "batch": batch, "unet_calls_per_crop": n_calls,
                         "ms_per_crop_per_call": 1000 * s_call / batch,
                         "s_per_crop": s_crop, "crops_per_s": 1 / s_crop,
                         "share_of_cpu_peak": calls[batch]["gflops_achieved"] / peak})
        out["models"][name] = {
            "spec": {"name": spec.name, "kind": spec.kind, "crop_size": spec.crop_size,
                     "latent_shape": list(spec.latent_shape)},
            "unet_params": sum(p.numel() for p in model.unet.parameters()),
            "unet_gflop_per_call": flop / 1e9,
            "unet_call": calls, "grid": grid,
        }
    return out


# -- (b) pipeline, (c) memory: child processes ------------------------------------------------


def _child(args: list[str], threads: int, timeout: float = 600) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed", "--threads", str(threads), "--child", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child_pipeline(model_name: str) -> dict:
    from vidanon import pipeline
    from vidanon.config import load_settings
    from vidanon.diffusion.engine import Engine
    from vidanon.media import probe, read_frames

    settings = load_settings()
    info = probe(CROWD)
    rec: dict = {"clip": CROWD.name, "frames": info.frames, "size": [info.width, info.height],
                 "model": model_name, "settings": settings["diffusion"],
                 "rss_after_imports_mb": peak_rss_mb()}
    dec: dict = {}
    with timed(dec):
        n = sum(1 for _ in read_frames(CROWD))
    dec["frames"] = n
    dt: dict = {}
    with timed(dt):
        tracks = pipeline.detect_and_track(CROWD, info, settings, quiet=True)
    dt["tracks"] = len(tracks)

    engine_s = [0.0]
    engine_crops = [0]
    orig = Engine.anonymize

    def wrapped(self, crops, masks, keys):
        t0 = time.perf_counter()
        try:
            return orig(self, crops, masks, keys)
        finally:
            engine_s[0] += time.perf_counter() - t0
            engine_crops[0] += len(crops)

    Engine.anonymize = wrapped
    full: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp, timed(full):
            res = pipeline.run(CROWD, Path(tmp) / "out.mp4", Path(tmp) / "keys.json",
                               settings, model_name=None if model_name == "bundled"
                               else model_name, device="cpu", quiet=True)
    finally:
        Engine.anonymize = orig
    full.update({"tracks": res.tracks, "faces": res.faces, "blurred": res.blurred,
                 "diffusion_crops": engine_crops[0], "engine_s": engine_s[0]})
    rec.update({"decode": dec, "detect_track": dt, "run": full, "peak_rss_mb": peak_rss_mb()})
    return rec


def child_memory(frames: int) -> dict:
    from vidanon import pipeline
    from vidanon.config import load_settings
    from vidanon.media import probe, read_frames

    settings = load_settings()
    info = probe(WALKING)
    n = min(frames, info.frames)
    base = peak_rss_mb()
    pipeline.read_frames = lambda p, start=0: itertools.islice(read_frames(p, start), n)
    info = dataclasses.replace(info, frames=n)
    rec: dict = {"clip": WALKING.name, "frames": n, "rss_after_imports_mb": base}
    with timed(rec):
        tracks = pipeline.detect_and_track(WALKING, info, settings, quiet=True)
    rec["tracks"] = len(tracks)
    rec["peak_rss_mb"] = peak_rss_mb()
    return rec


# -- (d) CelebA-HQ-shaped FLOPs --------------------------------------------------------------


def count_flops(fn) -> tuple[int, dict]:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        fn()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts()["Global"].items()}
    return fc.get_total_flops(), by_op


def bench_flops(calls_per_crop: dict | None = None, time_call: bool = True) -> dict:
    from vidanon.diffusion.models import celebahq_shaped

    model = celebahq_shaped()
    c, h, w = model.spec.latent_shape
    s = model.spec.crop_size
    z = torch.randn(1, c, h, w)
    x = torch.rand(1, 3, s, s) * 2 - 1
    unet_flops, unet_ops = count_flops(lambda: model.eps(z, 500))
    enc_flops, _ = count_flops(lambda: model.encode(x))
    dec_flops, _ = count_flops(lambda: model.decode(z))
    rec: dict = {
        "crop_size": s, "latent_shape": [c, h, w],
        "unet_params": sum(p.numel() for p in model.unet.parameters()),
        "vqvae_params": sum(p.numel() for p in model.vae.parameters()),
        "counter": "torch.utils.flop_counter.FlopCounterMode counts 2 FLOP per multiply-add",
        "unet_flop": unet_flops, "unet_flop_by_op": unet_ops,
        "encode_flop": enc_flops, "decode_flop": dec_flops,
        "h100_tflops": H100_FP16_DENSE_TFLOPS,
    }
    per_crop_vae = 2 * enc_flops + dec_flops  # encode crop + encode filled crop, decode once
    rec["h100"] = []
    for steps, calls in (calls_per_crop or {50: 50 * 4 + 100}).items():
        total = calls * unet_flops + per_crop_vae
        rec["h100"].append({
            "steps": int(steps), "unet_calls_per_crop": calls,
            "tflop_per_crop": total / 1e12,
            "crops_per_s_unet_only": H100_FP16_DENSE_TFLOPS * 1e12 / (calls * unet_flops),
            "crops_per_s_with_vae": H100_FP16_DENSE_TFLOPS * 1e12 / total,
        })
    if time_call:
        with torch.no_grad():
            t: dict = {"batch": 1}
            with timed(t):
                model.eps(z, 500)
            rec["cpu_unet_call"] = t
            rec["cpu_gflops_achieved"] = unet_flops / t["seconds"] / 1e9
    return rec


# -- report ----------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    L: list[str] = ["## Speed (CPU)", ""]
    m = data["machine"]
    L.append(f"`python -m benchmarks.speed`. torch {m['torch']}, {m['torch_threads']} "
             f"thread(s) for torch and OpenCV, nproc {m['nproc']}. The machine is shared with a "
             "background training process using about one core, so every row carries the "
             "1-minute load average before/after it. With 2 threads, single UNet calls varied "
             "by up to 40x (OpenMP threads stalling when one is descheduled), so the benchmarks "
             "pin 1 thread: numbers are stable but pessimistic (one core, not the machine).")
    if "engine" in data:
        e = data["engine"]
        calls = ", ".join(f"{k} steps: {v:.1f}" for k, v in e["calls_per_crop"].items())
        L += ["", "### (a) Engine alone", "",
              "One batched UNet call timed (median of 3 after a warm-up; 1 call for the "
              "CelebA-HQ-shaped model). A crop costs `steps` calls for the background "
              "trajectory, `steps` for sampling and a tolerance-dependent number for the "
              "inversion; the mean calls per crop were measured with the default settings "
              f"(refine ≤ 12, tol 2e-3) on 8 held-out faces with the bundled prior ({calls}) "
              "and are applied to every model as an estimate. *Share of CPU peak* = achieved "
              f"UNet GFLOP/s over a 1024² fp32 matmul on the same core "
              f"({e['cpu_matmul_gflops']:.0f} GFLOP/s), the compute limit here. "
              "Encode/decode and background fill are excluded.", ""]
        rows = []
        for name, r in e["models"].items():
            for b, c in r["unet_call"].items():
                rows.append([name, f"{r['unet_params'] / 1e6:.2f} M",
                             f"{r['unet_gflop_per_call']:.2f}", b,
                             f"{1000 * c['s_per_call']:.1f}",
                             f"{1000 * c['s_per_call'] / int(b):.2f}",
                             f"{c['gflops_achieved']:.1f}", fmt_load(c)])
        L.append(md_table(["model", "UNet params", "GFLOP / call / crop", "batch",
                           "ms / UNet call", "ms / crop / UNet call", "GFLOP/s",
                           "load before/after"], rows))
        L.append("")
        rows = []
        for name, r in e["models"].items():
            for g in r["grid"]:
                rows.append([name, g["steps"], g["batch"], f"{g['unet_calls_per_crop']:.1f}",
                             f"{1000 * g['s_per_crop']:.0f}", f"{g['crops_per_s']:.3f}",
                             f"{100 * g['share_of_cpu_peak']:.0f} %"])
        L.append(md_table(["model", "steps", "batch", "UNet calls / crop", "ms / crop",
                           "crops/s", "share of CPU peak"], rows))
    if "pipeline" in data:
        p = data["pipeline"]
        r = p["run"]
        n = p["frames"]
        L += ["", "### (b) Whole pipeline", "",
              f"`{p['clip']}` ({n} frames, {p['size'][0]}x{p['size'][1]}), model "
              f"`{p['model']}`, default preset (steps {p['settings']['steps']}, refine "
              f"{p['settings']['refine']}, batch {p['settings']['batch_size']}), run in a child "
              "process (`vidanon.pipeline.run`, quiet, temporary keyring and output).", ""]
        rows = [
            ["decode (read_frames only)", f"{p['decode']['seconds']:.2f}",
             f"{n / p['decode']['seconds']:.1f}", "", fmt_load(p["decode"])],
            ["detect + track (detect_and_track)", f"{p['detect_track']['seconds']:.2f}",
             f"{n / p['detect_track']['seconds']:.1f}", "", fmt_load(p["detect_track"])],
            ["engine inside run (Engine.anonymize)", f"{r['engine_s']:.2f}", "",
             f"{r['diffusion_crops'] / r['engine_s']:.2f}" if r["engine_s"] else "", ""],
            ["full run (probe, model, detect, track, anonymize, encode, sidecar)",
             f"{r['seconds']:.2f}", f"{n / r['seconds']:.2f}",
             f"{r['diffusion_crops'] / r['seconds']:.2f}", fmt_load(r)],
        ]
        L.append(md_table(["stage", "s", "frames/s", "crops/s", "load before/after"], rows))
        L += ["", f"{r['tracks']} tracks, {r['faces']} face instances ({r['blurred']} blurred, "
              f"{r['diffusion_crops']} diffusion crops). Peak RSS of the child: "
              f"{p['peak_rss_mb']:.0f} MB (after imports: {p['rss_after_imports_mb']:.0f} MB)."]
    if "memory" in data:
        L += ["", "### (c) Memory flatness", "",
              "Peak RSS (`ru_maxrss`) of `read_frames` + `detect_and_track` (default preset) on "
              "the first N frames, each N in its own child process:", ""]
        rows = [[r["clip"], r["frames"], f"{r['rss_after_imports_mb']:.0f}",
                 f"{r['peak_rss_mb']:.0f}", f"{r['seconds']:.1f}", fmt_load(r)]
                for r in data["memory"]]
        L.append(md_table(["clip", "frames", "RSS after imports MB", "peak RSS MB", "s",
                           "load before/after"], rows))
        if len(data["memory"]) == 2:
            a, b = data["memory"]
            frame_mb = 608 * 1080 * 3 / 2**20
            L += ["", f"Peak grows by {b['peak_rss_mb'] - a['peak_rss_mb']:.0f} MB for "
                  f"{b['frames'] - a['frames']} more frames (holding those frames would take "
                  f"{(b['frames'] - a['frames']) * frame_mb:.0f} MB)."]
    if "flops" in data:
        f = data["flops"]
        L += ["", "### (d) CompVis/ldm-celebahq-256-shaped model: compute budget", "",
              f"`celebahq_shaped()` (random weights, same architecture): UNet "
              f"{f['unet_params'] / 1e6:.1f} M parameters, VQ-VAE "
              f"{f['vqvae_params'] / 1e6:.1f} M; {f['crop_size']}-px crops, latent "
              f"{'x'.join(map(str, f['latent_shape']))}. Counted with `FlopCounterMode` at "
              "batch 1; that counter counts **2 FLOP per multiply-add**, the same convention "
              "as the H100's quoted peak, so no halving is applied (MACs = FLOP / 2).", ""]
        rows = [["UNet call", f"{f['unet_flop'] / 1e9:.1f}", f"{f['unet_flop'] / 2e9:.1f}"],
                ["VQ encode", f"{f['encode_flop'] / 1e9:.1f}", f"{f['encode_flop'] / 2e9:.1f}"],
                ["VQ decode", f"{f['decode_flop'] / 1e9:.1f}", f"{f['decode_flop'] / 2e9:.1f}"]]
        L.append(md_table(["per crop", "GFLOP", "GMAC"], rows))
        ops = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in f["unet_flop_by_op"].items())
        L += ["", f"UNet GFLOP by op: {ops} (attention runs as bmm and is counted; "
              "normalisation, activations and softmax are not counted by FlopCounterMode, "
              "which may account for part of the gap to the ~202 GFLOP expected)."]
        L += ["", f"Compute limit on an H100 at {f['h100_tflops']:.0f} TFLOP/s (dense fp16 "
              "tensor-core peak; real UNets reach perhaps 30-60 % of it), with the UNet calls "
              "per crop measured in (a), per crop 2 VQ encodes + 1 decode:", ""]
        rows = [[h["steps"], f"{h['unet_calls_per_crop']:.1f}", f"{h['tflop_per_crop']:.1f}",
                 f"{h['crops_per_s_unet_only']:.0f}", f"{h['crops_per_s_with_vae']:.0f}"]
                for h in f["h100"]]
        L.append(md_table(["steps", "UNet calls / crop", "TFLOP / crop",
                           "crops/s (UNet only)", "crops/s (with VQ)"], rows))
        if "cpu_unet_call" in f:
            t = f["cpu_unet_call"]
            minutes = f["h100"][-1]["unet_calls_per_crop"] * t["seconds"] / 60
            L += ["", f"One batch-1 UNet call on this CPU: {t['seconds']:.2f} s "
                  f"({f['cpu_gflops_achieved']:.0f} GFLOP/s, load {fmt_load(t)}); a "
                  f"{f['h100'][-1]['steps']}-step crop would take ~{minutes:.0f} "
                  "min here, which is why this model is GPU-only."]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", default="", help="comma list of engine,pipeline,memory,flops")
    ap.add_argument("--pipeline-model", default=None,
                    help="default: the bundled prior if installed, else tiny-pixel")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenCV threads (1: stable on a shared machine)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    if a.child:
        what = a.child[0]
        rec = child_pipeline(a.child[1]) if what == "pipeline" else child_memory(int(a.child[1]))
        print(json.dumps(rec))
        return rec

    from vidanon.diffusion.models import bundled_available

    skip = set(filter(None, a.skip.split(",")))
    data: dict = {"machine": machine()}
    have_bundled = bundled_available()
    # Children first: Linux keeps a parent's RSS high-water mark in a child's ru_maxrss, so
    # they must start before the engine section loads the large models.
    if "pipeline" not in skip:
        name = a.pipeline_model or ("bundled" if have_bundled else "tiny-pixel")
        print(f"(b) pipeline with {name}", flush=True)
        data["pipeline"] = _child(["pipeline", name], a.threads)
        print(f"  run {data['pipeline']['run']['seconds']:.1f} s", flush=True)
    if "memory" not in skip and WALKING.exists():
        print("(c) memory", flush=True)
        data["memory"] = [_child(["memory", str(n)], a.threads) for n in (100, 300)]
        print("  peaks MB", [round(r["peak_rss_mb"]) for r in data["memory"]], flush=True)
    if "engine" not in skip:
        print("(a) engine", flush=True)
        data["engine"] = bench_engine(["tiny-pixel"] + (["bundled"] if have_bundled else [])
                                      + ["celebahq"])
    if "flops" not in skip:
        print("(d) flops", flush=True)
        data["flops"] = bench_flops(data.get("engine", {}).get("calls_per_crop"))
        print(f"  UNet {data['flops']['unet_flop'] / 1e9:.1f} GFLOP", flush=True)
    js, md = write_results("speed", data, markdown(data))
    print(f"wrote {js} and {md}")
    return data


if __name__ == "__main__":
    main()
