"""Assemble docs/benchmarks.md from the sections the benchmarks wrote.

    python -m benchmarks.report

Reads benchmarks/results/{detect,speed}.md (and quality.md if present); the header carries
the git commit, CPU model and date of this assembly, and each section's JSON keeps the
machine facts of its own run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os

from benchmarks._common import RESULTS, ROOT, cpu_model, git_commit

DOC = ROOT / "docs" / "benchmarks.md"
SECTIONS = ["detect", "speed", "recovery", "temporal", "steps"]

QUALITY_PLACEHOLDER = """## Quality

Pending: the face-set quality protocol (`python -m benchmarks.quality`: identity TAR@FAR=0.1 %
of anonymized vs original faces, recovery PSNR, wrong / one-bit-off keys, a sign-smoothness
attack, on held-out faces) is pending a trained prior; no numbers are reported yet."""


def header() -> str:
    runs = []
    for name in SECTIONS:
        js = RESULTS / f"{name}.json"
        doc = json.loads(js.read_text()) if js.exists() else None
        if isinstance(doc, dict) and "machine" in doc:  # the CPU speed/detect runs record it
            m = doc["machine"]
            runs.append(f"`{name}`: commit {m.get('commit')}, {m.get('date')}, load "
                        f"{m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    today = _dt.date.today().isoformat()
    lines = [
        "# Benchmarks",
        "",
        f"Commit `{git_commit()}`, CPU `{cpu_model()}` ({os.cpu_count()} cores visible), "
        f"assembled {today}. Runs: " + "; ".join(runs) + ".",
        "",
        "Reproduce: `python -m benchmarks.<name>` for detect, speed, recovery, temporal, steps "
        "and quality (and gpu_engine on a GPU), then `python -m benchmarks.report`. Raw "
        "numbers: `benchmarks/results/*.json`. Quality, recovery, temporal and steps were run "
        "on the provisional CPU-trained prior (see its model card) at the same commit.",
        "",
        "**Caveats.** CPU only: no GPU was available for this session, so GPU numbers are "
        "pending; the H100 figures below are a compute-limit derivation, not a measurement. "
        "The CPU is shared with a background training process that keeps about one of the two "
        "cores busy, so timings are contended and noisy; each carries `nproc` and the 1-minute "
        "load average before/after it, and torch/OpenCV are pinned to one thread for stability.",
    ]
    return "\n".join(lines)


def main() -> None:
    parts = [header()]
    for name in SECTIONS:
        md = RESULTS / f"{name}.md"
        if md.exists():
            parts.append(md.read_text().strip())
        else:
            parts.append(f"## {name}\n\nNot run yet (`python -m benchmarks.{name}`).")
    q = RESULTS / "quality.md"
    parts.append(q.read_text().strip() if q.exists() else QUALITY_PLACEHOLDER)
    DOC.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
