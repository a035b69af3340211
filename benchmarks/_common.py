"""Shared helpers for the benchmarks: machine facts, timing context, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict:
    import torch

    return {
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load(),
    }


@contextmanager
def timed(rec: dict):
    """Fill rec with seconds, nproc and the load average before and after the block."""
    rec["load_before"] = load()
    rec["nproc"] = os.cpu_count()
    t0 = time.perf_counter()
    try:
        yield rec
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        rec["load_after"] = load()


def fmt_load(rec: dict) -> str:
    """1-minute load before/after, e.g. '1.7/2.1'."""
    return f"{rec['load_before'][0]:.1f}/{rec['load_after'][0]:.1f}"


def write_results(name: str | Path, data: dict, markdown: str) -> tuple[Path, Path]:
    """``name`` (in benchmarks/results) or a ``.json`` path: writes it and the ``.md`` beside."""
    js = Path(name) if str(name).endswith(".json") else RESULTS / f"{name}.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    data.setdefault("machine", machine())
    data["machine"]["loadavg_end"] = load()
    md = js.with_suffix(".md")
    js.write_text(json.dumps(data, indent=1) + "\n")
    md.write_text(markdown.rstrip() + "\n")
    return js, md


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def set_threads(n: int) -> None:
    """Pin torch and OpenCV to n threads.

    On this 2-core machine shared with a one-core training job, two OpenMP threads stall at
    every barrier whenever one is descheduled (10-40x slower calls, seen in practice); one
    thread gives stable, reproducible numbers.
    """
    import cv2
    import torch

    torch.set_num_threads(n)
    cv2.setNumThreads(n)
