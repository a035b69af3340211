"""Concurrent ``vidanon run`` processes sharing one keyring lose no key (issue #13).

Starts N real ``vidanon run`` processes at once (tiny random model, a 5-frame cut of the
sample, distinct outputs, one keyring; plain or encrypted), then checks that every run
exited 0, that the keyring holds every job as complete, and that every output is
recoverable: its sidecar verifies under the master key from the keyring and each track's
key id matches, and ``vidanon recover`` of one track succeeds.  Too slow for the test suite
(each process imports torch); the result is recorded in benchmarks/results/concurrent_runs.md.

    python -m benchmarks.concurrent_runs [--procs 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import RESULTS, ROOT, cpu_model, git_commit

FAST = ["--model", "tiny-pixel", "--set", "diffusion.steps=2", "--set", "diffusion.refine=0",
        "--quiet"]


def _vidanon(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vidanon.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_round(tmp: Path, clip: Path, procs: int, passphrase: str | None) -> dict:
    from vidanon import sidecar
    from vidanon.keys import Keyring, track_key

    ring = tmp / "ring.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if passphrase:
        env["VIDANON_PASSPHRASE"] = passphrase
    outs = [tmp / f"out{i}.anon.mp4" for i in range(procs)]
    t0 = time.monotonic()
    runs = [_vidanon("run", str(clip), "-o", str(o), "--keyring", str(ring), *FAST, env=env)
            for o in outs]
    codes = [p.wait() for p in runs]
    wall = time.monotonic() - t0
    errors = [p.stderr.read().strip() for p in runs if p.returncode]
    jobs = Keyring.open(ring, passphrase).jobs
    recoverable = 0
    for o in outs:
        try:
            doc = sidecar.read(sidecar.sidecar_path(o))
            master = Keyring.open(ring, passphrase).master(doc["job_id"])
            sidecar.verify(doc, master=master)
            ok = jobs[doc["job_id"]]["status"] == "complete" and all(
                track_key(master, doc["job_id"], t["key_track"]).id == t["key_id"]
                for t in doc["tracks"])
            if ok and doc["tracks"]:
                r = _vidanon("recover", str(o), "--track", str(doc["tracks"][0]["id"]),
                             "--keyring", str(ring), "-o", str(o.with_suffix(".rec.mp4")),
                             "--model", "tiny-pixel", "--quiet", env=env)
                ok = r.wait() == 0
            recoverable += bool(ok)
        except Exception as exc:  # noqa: BLE001 - counted, reported
            errors.append(f"{o.name}: {exc}")
    return {"procs": procs, "encrypted": bool(passphrase), "exit_codes": codes,
            "jobs_in_keyring": len(jobs), "recoverable": recoverable,
            "lost": procs - recoverable, "wall_s": round(wall, 1), "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from vidanon.media import cut

    rows = []
    with tempfile.TemporaryDirectory() as d:
        clip = Path(d) / "crowd5.mp4"
        cut(ROOT / "samples" / "crowd.mp4", clip, 1.0, 5 / 29.97)
        for r in range(a.rounds):
            for pw in (None, "bench-passphrase"):
                tmp = Path(d) / f"r{r}{'e' if pw else 'p'}"
                tmp.mkdir()
                row = one_round(tmp, clip, a.procs, pw)
                print(json.dumps(row))
                rows.append(row)
    total = sum(r["procs"] for r in rows)
    lost = sum(r["lost"] for r in rows)
    lines = ["# Concurrent `vidanon run` on one keyring", "",
             f"{a.procs} `vidanon run` processes started at once, one shared keyring, "
             f"{a.rounds} rounds each plain and encrypted; tiny-pixel model, 5-frame clip. "
             f"A run counts as recoverable when it exited 0, its job is complete in the "
             f"keyring, its sidecar verifies under that master key and `vidanon recover` of "
             f"one track succeeds.", "",
             f"**{lost} of {total} runs lost** (not recoverable).", "",
             "| round | keyring | exit codes | jobs in keyring | recoverable | wall s |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i // 2 + 1} | {'encrypted' if r['encrypted'] else 'plain'} | "
                     f"{r['exit_codes']} | {r['jobs_in_keyring']} | {r['recoverable']} | "
                     f"{r['wall_s']} |")
    lines += ["", f"Machine: {cpu_model()}, {os.cpu_count()} cores; commit {git_commit()}."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "concurrent_runs.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "concurrent_runs.json").write_text(json.dumps(rows, indent=1))
    print(f"{lost} of {total} lost")
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
