"""Assemble docs/benchmarks.md from the sections the benchmarks wrote.

    python -m benchmarks.report

Reads the sections the benchmarks wrote to benchmarks/results/*.md, puts a headline table
built from their JSON on top; the header carries the git commit, CPU model and date of this
assembly, and each section's JSON keeps the machine facts of its own run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os

from benchmarks._common import RESULTS, ROOT, cpu_model, git_commit

DOC = ROOT / "docs" / "benchmarks.md"
SECTIONS = [*(f"leak_mask_{m}{g}" for m in ("face", "keep-eyes", "keep-mouth")
              for g in ("", "_noguard")),
            "guard_cost", "masks", "scale", "quality", "inpaint", "small_faces", "noise_scale",
            "mean_keeping",
            "anchor", "prior",
            "masked_sampling",
            "recovery", "recovery_frame_fit",
            "temporal",
            "steps", "detect", "speed", "concurrent_runs"]


def _load(name: str) -> dict | None:
    js = RESULTS / f"{name}.json"
    doc = json.loads(js.read_text()) if js.exists() else None
    return doc if isinstance(doc, dict) else None


def headline() -> str:
    """The few numbers a reader needs first, each pointing at its section."""
    rows = []
    q = _load("quality")
    if q:
        for set_name, st in q["sets"].items():
            c = st["conditions"]
            for idm in q["identity_models"]:
                attack = max(v[idm]["above"] for k, v in c.items() if "attack" in k)
                rows.append([f"{set_name}, {idm}",
                             f"{100 * c['anonymized'][idm]['above']:.1f} %",
                             f"{100 * c['recovered (right key)'][idm]['above']:.1f} %",
                             f"{100 * c['recovered (one bit off)'][idm]['above']:.1f} %",
                             f"{100 * attack:.1f} %"])
    lines = ["## Headline", ""]
    if rows:
        lines += ["Share of faces that a face recogniser still matches to the original "
                  "(threshold at FAR 0.1 %; see *Quality*):", "",
                  "| face set, recogniser | anonymized | recovered, right key | one bit off | "
                  "best key-free attack |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    p = _load("prior")
    if p:
        lines += ["", f"Unconditional samples of the bundled prior with a detected face: "
                  f"{100 * p['sample_face_rate']:.1f} % (target 90 %; see *Face prior*)."]
    return "\n".join(lines)


def leak_presets() -> str:
    """One row per mask preset, guard on and off: the outside judge's totals over all clips,
    and what the guard did (#12's comparison in one table)."""
    rows = []
    for m in ("face", "keep-eyes", "keep-mouth"):
        for g in ("", "_noguard"):
            doc = _load(f"leak_mask_{m}{g}")
            if not doc or "beyond_blur" not in doc.get("total", {}):
                continue
            t, clips = doc["total"], doc["clips"].values()
            priv = [c.get("privacy") or {} for c in clips]
            tim = [c.get("timings") or {} for c in clips]
            if g:
                guard = "off | - | -"
            else:
                esc = sum(p.get("faces_escalated", 0) for p in priv)
                blur = sum(p.get("faces_blurred", 0) for p in priv)
                shares = [100 * x.get("guard_share", 0) for x in tim]
                guard = (f"on | {esc} / {blur} of {sum(c.get('face_frames', 0) for c in clips)}"
                         f" | {min(shares):.0f}-{max(shares):.0f} %")
            untouched = sum(len(c.get("untouched", [])) for c in clips)
            rows.append(f"| `{m}` | {t['vidanon']['matched']} of {t['vidanon']['faces']} "
                        f"({t['vidanon']['matched_pct']} %) | {t['beyond_blur']['matched']} "
                        f"({t['beyond_blur']['matched_pct']} %) | {t['blur']['matched']} "
                        f"({t['blur']['matched_pct']} %) | {untouched} | {guard} |")
    if not rows:
        return ""
    return "\n".join([
        "## Leak by mask preset", "",
        "The outside judge (*Video leak* below: CenterFace, MobileFaceNet + dlib at FAR 0.1 % "
        "for each face's size) over all clips of `leak_mask_<preset>[_noguard]`, with the "
        "privacy guard on and off. Guard: face-frames escalated / blurred, and its share of "
        "run time (lowest-highest clip). Untouched: faces CenterFace found that the output "
        "leaves as they were (each counts as matched and beyond blur).", "",
        "| preset | matched (either) | beyond blur | blur baseline | untouched | guard "
        "| escalated / blurred | guard share |", "|---|---|---|---|---|---|---|---|", *rows])


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
        "Reproduce: `python -m benchmarks.<name>` for quality, recovery, temporal, prior, "
        "steps, detect and speed (and gpu_engine on a GPU), then `python -m benchmarks.report`."
        " Raw numbers: `benchmarks/results/*.json`. Quality, recovery, temporal, prior and "
        "steps use the bundled CPU-trained prior (see its model card) and the default preset.",
        "",
        "**Which model.** Since session 10 the bundled prior is background-conditioned "
        "(`vidanon/prior/inpaint.py`: 22,000 unconditional + 7,773 conditioned CPU steps); "
        "quality, inpaint, recovery, prior, `leak_mask_face`, the pictures and the "
        "`head_motion_a` consistency run (`results/session10/`) measure it. The other leak "
        "variants, guard cost, temporal, the steps x temperature grid, mean keeping, anchor "
        "and masked sampling are from the unconditional prior at 16,344 steps (sessions 6-9; "
        "temporal and guard cost at 4 DDIM steps). "
        "Masks and scale are from session 4-5 "
        "(6,574-step prior); steps, detect and speed were last run in session 2 with the "
        "retired 64-px pixel prior (their commits are listed above) and are kept until re-run; "
        "read them as history.",
        "",
        "**Caveats.** CPU only: no GPU has been lent to this project's sessions yet, so GPU "
        "numbers are pending; the H100 figures below are a compute-limit derivation, not a "
        "measurement. The 2-core CPU ran two benchmarks at a time with one torch thread each, "
        "so timings are per core and pessimistic; each timing carries `nproc` and the 1-minute "
        "load average.",
    ]
    return "\n".join(lines)


def main() -> None:
    parts = [header(), headline(), leak_presets()]
    for name in SECTIONS:
        md = RESULTS / f"{name}.md"
        if md.exists():
            parts.append(md.read_text().strip())
        else:
            parts.append(f"## {name}\n\nNot run yet (`python -m benchmarks.{name}`).")
    DOC.write_text("\n\n".join(p for p in parts if p) + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
