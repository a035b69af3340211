"""Re-export a training run as the bundled prior, and refresh its sample grid and model card.

Usage (from the repo root)::

    python -m vidanon.prior.export runs/prior-cpu

This takes the newest checkpoint of the run, writes its EMA weights (fp16) to
``vidanon/prior/weights/`` with the measured crop template, renders ``docs/prior_samples.png``
(64 DDIM samples, 50 steps) and rewrites the generated block of ``MODEL_CARD.md``.  The template
is measured once per run on the 128-px training faces and cached in ``RUN_DIR/template.json``,
because detection on ~9k faces takes a minute and the result does not change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vidanon.diffusion.models import BUNDLED_DIR, load_folder
from vidanon.prior.checkpoint import load_checkpoint, write_text_atomic
from vidanon.prior.data import load_dataset, split_indices
from vidanon.prior.sample import sample_grid, save_png
from vidanon.prior.template import detect_landmarks, detection_rate, template_from_landmarks
from vidanon.prior.train import export_weights

REPO = Path(__file__).resolve().parents[2]
FACES_128 = REPO.parent / "shared" / "data" / "faces" / "utkface_crop128.npz"
SAMPLES_PNG = REPO / "docs" / "prior_samples.png"
CARD_BEGIN = "<!-- export:begin (written by python -m vidanon.prior.export) -->"
CARD_END = "<!-- export:end -->"


def run_template(run_dir: Path, faces: Path | None = FACES_128) -> dict:
    """The crop template for a run: cached ``template.json`` or measured on training faces."""
    cache = run_dir / "template.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if faces is None or not Path(faces).exists():
        old = BUNDLED_DIR / "vidanon.json"
        if old.is_file():  # keep the previously measured one rather than guess
            meta = json.loads(old.read_text())
            return {"template": meta["template"], "face_oval": meta["face_oval"]}
        raise FileNotFoundError(f"no faces to measure the template on ({faces})")
    imgs, names = load_dataset(faces, 128)
    train_idx, _ = split_indices(names)
    lm = detect_landmarks(imgs[train_idx])
    template, oval = template_from_landmarks(lm)
    info = {
        "template": template,
        "face_oval": oval,
        "detection_rate": round(detection_rate(lm), 5),
        "n_faces": int(len(train_idx)),
        "source": Path(faces).name,
        "method": "YuNet 2023mar on 128-px training faces padded 25% (replicate), "
        "median over faces with exactly one detection",
    }
    # A read-only run folder (files fetched from a GPU lease) just gets no cache.
    with contextlib.suppress(OSError):
        write_text_atomic(cache, json.dumps(info, indent=1) + "\n")
    return info


def _init_record(meta: dict) -> dict | None:
    """Where a run started from (``train --init-from``); early runs kept it in the history."""
    if meta.get("init_from"):
        return meta["init_from"]
    for h in meta.get("history", []):
        if "init_step" in h:
            return {"path": h["init_from"], "step": h["init_step"]}
    return None


def _card_block(meta: dict, tmpl: dict, dest: Path) -> str:
    cfg = meta["config"]
    hist = [h for h in meta.get("history", []) if "step" in h and "loss" in h]
    pts = [h for h in hist if h["step"] in _pick_steps([h["step"] for h in hist])]
    curve = ", ".join(f"{h['step']}: {h['loss']:.4f}" for h in pts)
    minutes = _train_minutes(hist)
    size = sum(f.stat().st_size for f in (dest / "unet").rglob("*") if f.is_file())
    lines = [
        CARD_BEGIN,
        f"- Exported: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"from checkpoint step {meta['step']} (`{Path(meta['_path']).name}`).",
        f"- Preset `{cfg['preset']}`, {cfg['resolution']} px, batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}, EMA {cfg['ema_decay']}, seed {cfg['seed']}, device "
        f"`{meta.get('device', '?')}`, torch threads {meta.get('threads', '?')}, "
        f"about {minutes:.0f} min of training (wall time, all resumed segments).",
        f"- Training faces {cfg['n_train']}, held out {cfg['n_heldout']} "
        f"({cfg['heldout_rule']}).",
        f"- Loss (mean over the preceding log interval) by step: {curve}.",
        f"- Template (crop fractions, [left eye, right eye, nose, left mouth, right mouth] in "
        f"the image): `{tmpl['template']}`; face oval (cx, cy, rx, ry): `{tmpl['face_oval']}`"
        + (
            f"; YuNet found exactly one face in {tmpl['detection_rate'] * 100:.2f}% of "
            f"{tmpl['n_faces']} training faces."
            if "detection_rate" in tmpl
            else "."
        ),
        f"- UNet weights: {size / 1e6:.1f} MB fp16 safetensors.",
        *([f"- Background-conditioned (`vidanon.prior.inpaint`), started from the "
           f"unconditional prior at step {init['step']}."]
          if (init := _init_record(meta)) else []),
        CARD_END,
    ]
    return "\n".join(lines)


def _train_minutes(history: list[dict]) -> float:
    """Wall minutes over all segments: ``elapsed_s`` restarts at 0 when a run is resumed."""
    total, last = 0.0, 0.0
    for h in history:
        e = float(h.get("elapsed_s", 0.0))
        if e < last:
            total += last
        last = e
    return (total + last) / 60


def _pick_steps(steps: list[int], k: int = 10) -> set[int]:
    if len(steps) <= k:
        return set(steps)
    return {steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)}


def update_card(card: Path, block: str) -> None:
    """Replace the generated block of the model card (or append one)."""
    text = card.read_text() if card.exists() else ""
    pat = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END), re.S)
    text = pat.sub(lambda _m: block, text) if pat.search(text) else text + "\n" + block + "\n"
    write_text_atomic(card, text)


def main(argv: Sequence[str] | None = None) -> None:
    """Export RUN_DIR's newest checkpoint, then write the sample grid and model card block."""
    ap = argparse.ArgumentParser(prog="python -m vidanon.prior.export", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--dest", type=Path, default=BUNDLED_DIR)
    ap.add_argument("--faces", type=Path, default=FACES_128, help="128-px npz for the template")
    ap.add_argument("--samples", type=Path, default=SAMPLES_PNG)
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decoder", type=Path, default=None,
                    help="cycle fine-tuned TAEF2 decoder state (python -m vidanon.prior.cycle)")
    ap.add_argument("--strength", type=float, default=1.0,
                    help="recommended DDIM strength stored with the model (engine default)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="recommended scale of the flipped face noise (engine default; "
                         "benchmarks.prior measures the face rate at it)")
    ap.add_argument("--keep-mean", type=float, default=0.0,
                    help="recommended keyed map: 0 = ±1 flip, in (0, 1] = mean-keeping flip "
                         "(vidanon/diffusion/keyed.py)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tmpl = run_template(a.run_dir, a.faces)
    _, meta = load_checkpoint(a.run_dir)
    dest = export_weights(a.run_dir, a.dest, tmpl["template"], tmpl["face_oval"],
                          extra_meta={"engine": {"strength": a.strength,
                                                      "temperature": a.temperature,
                                                      "keep_mean": a.keep_mean}})
    if a.decoder is not None:
        from vidanon.prior.cycle import export_decoder

        export_decoder(a.decoder, dest / "taef2")
    model = load_folder(dest)
    spec = model.spec
    print(f"exported step {meta['step']} to {dest} ({spec.name}, crop {spec.crop_size})")
    update_card(dest / "MODEL_CARD.md", _card_block(meta, tmpl, dest))
    if not a.no_samples:
        png = save_png(sample_grid(dest, n=a.n, steps=a.steps, temperature=a.temperature),
                       a.samples)
        print(f"samples: {png}")


if __name__ == "__main__":
    main()
