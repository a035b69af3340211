"""The latent training set of the face prior: TAEF2 latents of the aligned faces, cached.

Encoding 9,780 faces (and their mirror images, because a mirrored latent is not the latent of
the mirrored face) costs about 15 CPU-minutes; training touches every face thousands of times,
so the latents are encoded once into an npz (``latents``, ``latents_flip``, ``names``) and the
prior trains on those.  Per-channel statistics of the *training* split normalise the latents
to unit variance (TAEF2's channels range 0.5-1.1 std); they travel with the exported model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidanon.prior.autoencoder import TinyAutoencoder, load_taef2
from vidanon.prior.data import load_dataset


def is_latent_cache(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as z:
        return "latents" in z.files


def encode_cache(data: str | Path, out: Path, resolution: int = 128,
                 ae: TinyAutoencoder | None = None, batch: int = 64,
                 quiet: bool = False) -> Path:
    """Encode the faces of ``data`` (npz or folder) and their mirror images to ``out``."""
    faces, names = load_dataset(data, resolution)
    ae = ae or load_taef2()
    lat = []
    with torch.no_grad():
        for flip in (False, True):
            part = []
            for i in tqdm(range(0, len(faces), batch), disable=quiet, desc="encode"):
                x = torch.from_numpy(faces[i:i + batch].copy()).permute(0, 3, 1, 2)
                x = x.float() / 127.5 - 1
                part.append(ae.encode_raw(x.flip(-1) if flip else x).half().numpy())
            lat.append(np.concatenate(part))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, latents=lat[0], latents_flip=lat[1], names=np.array(names))
    tmp.replace(out)
    return out


def load_latents(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Raw latents (N, C, h, w) float16, their mirrored counterparts (or None), names."""
    with np.load(path) as z:
        flip = z["latents_flip"] if "latents_flip" in z.files else None
        return z["latents"], flip, [str(n) for n in z["names"]]


def channel_stats(latents: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (the shift and scale that normalise latents)."""
    x = latents.astype(np.float32)
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


def main() -> None:
    """``python -m vidanon.prior.latents FACES.npz OUT.npz``: build the latent cache."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vidanon.prior.latents")
    ap.add_argument("faces")
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    encode_cache(a.faces, a.out)


if __name__ == "__main__":
    main()
