"""Engine throughput on a GPU: crops/s against the compute limit.

    python -m benchmarks.gpu_engine [--batch 64] [--steps 50] [--refine 0 1] [--compile]

For the model shaped like CompVis/ldm-celebahq-256 (random weights, same architecture) and
the bundled prior, in fp16: one warm-up transform, then a timed ``Engine.anonymize`` of one
batch. The compute limit is GFLOP per UNet call x UNet calls per crop / peak TFLOP/s.
Writes benchmarks/results/gpu_engine.{json,md}. Needs CUDA; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vidanon.diffusion.engine import Engine, EngineSettings
from vidanon.diffusion.models import bundled_available, load_model
from vidanon.keys import Key

OUT = Path(__file__).resolve().parent / "results" / "gpu_engine.json"
UNET_GFLOP = {"celebahq-shaped": 192.0}  # FlopCounterMode, batch 1 (benchmarks/speed.py)


def time_engine(name: str, batch: int, steps: int, refine: int, compile_: bool) -> dict:
    model = load_model(name, device="cuda", half=True)
    eng = Engine(model, EngineSettings(steps=steps, refine=refine, batch_size=batch,
                                       compile=compile_))
    s = model.spec.crop_size
    x = torch.rand(batch, 3, s, s) * 2 - 1
    m = torch.zeros(batch, 1, s, s)
    m[:, :, s // 8: -s // 8, s // 8: -s // 8] = 1
    keys = [Key.generate() for _ in range(batch)]
    eng.anonymize(x, m, keys)  # warm-up (and compilation)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    eng.anonymize(x, m, keys)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    row = {"model": name, "batch": batch, "steps": steps, "refine": refine,
           "compile": compile_, "unet_calls_per_crop": eng.unet_calls_per_crop,
           "seconds": round(dt, 3), "crops_per_s": round(batch / dt, 2),
           "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--refine", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_engine needs a CUDA GPU")
    names = ["celebahq-shaped"] + (["default"] if bundled_available() else [])
    rows = []
    for name in names:
        for refine in a.refine:
            for comp in ([False, True] if a.compile else [False]):
                row = time_engine(name, a.batch, a.steps, refine, comp)
                if name in UNET_GFLOP:
                    limit = a.peak_tflops * 1e3 / (UNET_GFLOP[name] * row["unet_calls_per_crop"])
                    row["compute_limit_crops_per_s"] = round(limit, 1)
                    row["share_of_limit"] = round(row["crops_per_s"] / limit, 3)
                rows.append(row)
                print(json.dumps(row))
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "peak_tflops": a.peak_tflops, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    md = [f"## GPU engine ({result['device']}, torch {result['torch']})", "",
          "| model | batch | steps | refine | compile | crops/s | limit | share | GPU MiB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['refine']} | "
                  f"{r['compile']} | {r['crops_per_s']} | {r.get('compute_limit_crops_per_s', '')}"
                  f" | {r.get('share_of_limit', '')} | {r['peak_gpu_mib']} |")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
