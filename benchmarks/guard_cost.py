"""What the privacy guard costs on the README's first run (issue #12: <= 15 % of run time).

Runs ``samples/crowd.mp4`` at default settings through the API, round-robin over three
variants, ``--rounds`` times each, one model load per variant:

* ``guard``: the default (escalation steps tried in memory worst frames first, passing steps'
  faces handed to the re-render, failed tracks held for the rest of a pass);
* ``guard_cluster``: the guard escalating as on a Ray cluster (``ready_faces`` 0, no
  holding): each step probed on a track's 3 worst frames, then a whole re-render pass. This
  is also what a single machine did before session 7;
* ``no_verify``: ``--no-verify``.

Two measures of the guard's cost: its *share* as the run times it (embedding in the first
pass plus everything after the first pass), and the *difference* to ``--no-verify``
((median guard run - median no-verify run) / median guard run), which also counts what the
guard saves by not finishing tracks it has failed. Keys are random per run, so which tracks
escalate varies: every run's counts are kept.

    python -m benchmarks.guard_cost [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks._common import ROOT, load, machine, write_results

VARIANTS = {"guard": {"verify": True, "ready_faces": 2048, "hold": True},
            "guard_cluster": {"verify": True, "ready_faces": 0, "hold": False},
            "no_verify": {"verify": False, "ready_faces": 2048, "hold": True}}


def one_run(renderer, verify: bool, tmp: Path, i: int) -> dict:
    from vidanon import pipeline
    from vidanon.config import load_settings

    settings = load_settings(None, [] if verify else ["guard.verify=false"])
    out = tmp / f"run{i}.anon.mp4"
    res = pipeline.run(ROOT / "samples" / "crowd.mp4", out, tmp / "ring.json", settings,
                       quiet=True, overwrite=True, renderer=renderer)
    p = res.privacy
    return {"load": load(), **res.timings,
            **{k: p.get(k) for k in ("faces_checked", "faces_escalated", "faces_blurred",
                                     "tracks_escalated")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from vidanon.passes import LocalRenderer

    rec = {"machine": machine(), "clip": "samples/crowd.mp4", "variants": {}}
    renderers = {name: LocalRenderer(None, "auto", ready_faces=v["ready_faces"], hold=v["hold"])
                 for name, v in VARIANTS.items()}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for name, v in VARIANTS.items():
                run = one_run(renderers[name], v["verify"], Path(d), r)
                rec["variants"].setdefault(name, []).append(run)
                print(name, run["total_s"], run.get("guard_share"), run.get("faces_escalated"),
                      flush=True)
    rec["machine"]["loadavg_end"] = load()
    med = {n: statistics.median(x["total_s"] for x in runs)
           for n, runs in rec["variants"].items()}
    rec["median_total_s"] = med
    rec["cost_vs_no_verify"] = {n: round((med[n] - med["no_verify"]) / med[n], 4)
                                for n in ("guard", "guard_cluster")}
    rec["median_guard_share"] = {n: statistics.median(x["guard_share"]
                                                      for x in rec["variants"][n])
                                 for n in ("guard", "guard_cluster")}
    write_results("guard_cost", rec, markdown(rec))


def markdown(rec: dict) -> str:
    m = rec["machine"]
    rows = []
    for name, runs in rec["variants"].items():
        for x in runs:
            rows.append(f"| `{name}` | {x['total_s']:.1f} | {x['render_s']:.1f} | "
                        f"{x['guard_embed_s']:.1f} | {x['guard_rerender_s']:.1f} | "
                        f"{100 * x['guard_share']:.0f} % | {x['guard_probes']} / "
                        f"{x['guard_probe_crops']} | {x.get('tracks_escalated') or 0} / "
                        f"{x.get('faces_escalated') or 0} / {x.get('faces_blurred') or 0} | "
                        f"{x['load'][0]:.1f} |")
    c, s = rec["cost_vs_no_verify"], rec["median_guard_share"]
    med = rec["median_total_s"]
    return "\n".join([
        "## Privacy guard cost", "",
        f"`python -m benchmarks.guard_cost`: `samples/crowd.mp4` (2 s, 10 tracks, 272 face "
        f"crops) at default settings, bundled prior, commit {m['commit']}, {m['cpu']} "
        f"({m['nproc']} cores), torch threads {m['torch_threads']}, {m['date']}; load "
        f"{m['loadavg_start']} -> {m.get('loadavg_end')}. Variants run round-robin. "
        "*Share*: the guard's embeddings in the first pass plus everything after it, over the "
        "run; *vs --no-verify*: (median run - median `no_verify` run) / median run.", "",
        "| variant | median run s | vs --no-verify | median share |", "|---|---|---|---|",
        *(f"| `{n}` | {med[n]:.1f} | {100 * c[n]:.0f} % | {100 * s[n]:.0f} % |"
          for n in ("guard", "guard_cluster")),
        f"| `no_verify` | {med['no_verify']:.1f} | - | - |", "",
        "| variant | run s | first pass s | guard embed s | after first pass s | share | "
        "probes / crops | escalated tracks / faces / blurred faces | load |",
        "|---|---|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
