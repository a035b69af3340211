"""Why a replacement looks like a patch: the keyed flip, the step count, or masked sampling?

    python -m benchmarks.masked_sampling [--n 4]

For a few held-out 128-px faces and the bundled prior, the face oval is regenerated five ways:
sign-flipped inverted noise at 4 and at 50 DDIM steps, *fresh* Gaussian noise in the oval
(no key at all) at 25 steps, the inverted noise unflipped (the round trip) at 25 steps. It
also measures whether the inverted noise looks like Gaussian noise (std, and the correlation
of horizontal neighbours) inside the oval, since a flip of structured noise would be
off-distribution. Writes ``docs/masked_sampling.png`` (columns in that order, the original
first) and ``benchmarks/results/masked_sampling.{json,md}``.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

from benchmarks._common import ROOT, set_threads, write_results
from benchmarks._identity import FACES128
from vidanon.diffusion.engine import Engine, EngineSettings, background_fill
from vidanon.diffusion.models import load_model
from vidanon.keys import Key
from vidanon.masks import FaceMasks
from vidanon.prior.data import load_dataset, split_indices

GRID = ROOT / "docs" / "masked_sampling.png"
COLUMNS = ["original", "flip, 4 steps", "flip, 50 steps", "fresh noise, 25 steps",
           "round trip, 25 steps"]


def _rgb(z: torch.Tensor, model) -> np.ndarray:
    y = model.decode(z).float().clamp(-1, 1)
    return ((y.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.masked_sampling")
    ap.add_argument("--n", type=int, default=4)
    a = ap.parse_args(argv)
    set_threads(1)
    model = load_model(None, device="cpu")
    faces, names = load_dataset(FACES128, model.spec.crop_size)
    _, held = split_indices(names)
    x_np = faces[held[np.linspace(0, len(held) - 1, a.n).astype(int)]]
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    oval, _ = FaceMasks(model.spec, "oval", 0.06).oval()
    masks = torch.from_numpy((oval > 0.5).astype(np.float32))[None, None].repeat(a.n, 1, 1, 1)
    keys = [Key.generate() for _ in range(a.n)]
    g = torch.Generator().manual_seed(0)
    cols, stats = [x_np], {}
    for steps, how in ((4, "flip"), (50, "flip"), (25, "fresh"), (25, "round trip")):
        eng = Engine(model, EngineSettings(steps=steps, refine=2, strength=1.0))
        filled = background_fill(x, masks, eng.settings.fill_sigma * model.spec.crop_size)
        m = eng.latent_mask(masks)
        bg = eng.background_trajectory(model.encode(filled).float())
        zT = eng.invert(model.encode(x).float(), m, bg)
        inside = zT[m.expand_as(zT) > 0]
        pairs = (m[..., :, 1:] * m[..., :, :-1]).expand_as(zT[..., :, 1:]) > 0
        stats[f"{steps} steps"] = {
            "std": round(float(inside.std()), 3),
            "neighbour_corr": round(float((zT[..., :, 1:] * zT[..., :, :-1])[pairs].mean()
                                          / inside.var()), 3)}
        if how == "flip":
            zT = zT * (m * eng.flips(keys) + (1 - m))
        elif how == "fresh":
            zT = zT * (1 - m) + torch.randn(zT.shape, generator=g) * m
        cols.append(_rgb(eng.sample(zT, m, bg), model))
    grid = np.concatenate([np.concatenate(list(c), 0) for c in cols], 1)
    GRID.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(GRID), grid[..., ::-1])
    res = {"model": model.spec.name, "weights_sha256": model.spec.weights_sha256,
           "training_steps": model.spec.extra.get("training", {}).get("steps"),
           "faces": a.n, "columns": COLUMNS, "inverted_noise_inside_oval": stats,
           "grid": str(GRID.relative_to(ROOT))}
    md = "\n".join([
        "## Masked sampling: where the patch look comes from", "",
        f"`python -m benchmarks.masked_sampling` ({a.n} held-out faces, bundled prior, "
        f"{res['training_steps']} training steps). Columns of `docs/masked_sampling.png`: "
        + ", ".join(COLUMNS) + ".", "",
        "Inverted noise inside the oval (a standard Gaussian has std 1 and neighbour "
        "correlation 0): " + "; ".join(f"{k}: std {v['std']}, neighbour correlation "
                                        f"{v['neighbour_corr']}" for k, v in stats.items())
        + ".", "",
        "![masked sampling](masked_sampling.png)", ""])
    write_results("masked_sampling", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
