"""Quality against DDIM steps: identity metrics and cost, so users can pick the trade-off.

    python -m benchmarks.steps [--n 32] [--steps 4 8 16] [--refine 12]

Runs the face-set protocol (benchmarks.quality) at each step count and plots mean identity
cosine (anonymized, recovered, wrong key) and TAR@FAR=0.1 % of recovery against steps.
Writes benchmarks/results/steps.{json,md} and docs/quality_vs_steps.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import quality

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "steps.json"
PNG = ROOT / "docs" / "quality_vs_steps.png"
SHOWN = ("anonymized", "recovered (right key)", "recovered (random key)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--refine", type=int, default=12)
    ap.add_argument("--model", default=None)
    a = ap.parse_args(argv)
    runs: list[dict] = []
    for s in a.steps:
        args = ["--n", str(a.n), "--set", f"diffusion.steps={s}", "--set",
                f"diffusion.refine={a.refine}", "--video-faces", "0",
                "--out", str(OUT.with_name(f"steps_{s}.json"))]
        if a.model:
            args += ["--model", a.model]
        runs.append(quality.main(args))
    OUT.write_text(json.dumps(runs, indent=1))
    mfn = "MobileFaceNet"
    sets = [r["sets"]["utkface-heldout"] for r in runs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in SHOWN:
        ax1.plot(a.steps, [r["conditions"][name][mfn]["mean_cos"] for r in sets], "o-",
                 label=name)
    thr = runs[0]["identity_models"][mfn]["threshold_far_0.1pct"]
    ax1.axhline(thr, color="grey", ls="--", label="FAR 0.1 % thr.")
    ax1.set(xlabel="DDIM steps", ylabel="identity cosine to original", title="identity")
    ax1.legend(fontsize=7)
    ax2.plot(a.steps, [r["anonymize_s_per_crop"] for r in sets], "o-")
    ax2.set(xlabel="DDIM steps", ylabel="s per crop (CPU)", title="cost")
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PNG, dpi=110)
    md = ["## Quality against steps", "", f"`python -m benchmarks.steps` (n = {a.n}, refine "
          f"{a.refine}, strength {runs[0]['strength']}, MobileFaceNet); plot: "
          "`docs/quality_vs_steps.png`.", "",
          "| steps | anon cos | recovered cos | recovered TAR | random-key cos | s/crop CPU |",
          "|---|---|---|---|---|---|"]
    for s, r in zip(a.steps, sets, strict=True):
        c = {k: v[mfn] for k, v in r["conditions"].items()}
        md.append(f"| {s} | {c['anonymized']['mean_cos']} | "
                  f"{c['recovered (right key)']['mean_cos']} | "
                  f"{100 * c['recovered (right key)']['above']:.1f} % | "
                  f"{c['recovered (random key)']['mean_cos']} | {r['anonymize_s_per_crop']} |")
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
