"""The latent training set of the face prior: TAEF2 latents of the aligned faces, cached.

Encoding 9,780 faces (and their mirror images, because a mirrored latent is not the latent of
the mirrored face) costs about 15 CPU-minutes; training touches every face thousands of times,
so the latents are encoded once into an npz (``latents``, ``latents_flip``, ``names``) and the
prior trains on those.  Per-channel statistics of the *training* split normalise the latents
to unit variance (TAEF2's channels range 0.5-1.1 std); they travel with the exported model.
"""

from __future__ import annotations

from pathlib import Path

import cv2
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
    return _save(out, latents=_encode(ae, faces, batch, quiet, "encode"),
                 latents_flip=_encode(ae, faces, batch, quiet, "encode", mirror=True),
                 names=np.array(names))


def _encode(ae: TinyAutoencoder, faces: np.ndarray, batch: int, quiet: bool, desc: str,
            mirror: bool = False) -> np.ndarray:
    """Raw float16 latents of uint8 RGB faces (N, S, S, 3), ``batch`` at a time."""
    part = []
    with torch.no_grad():
        for i in tqdm(range(0, len(faces), batch), disable=quiet, desc=desc):
            x = torch.from_numpy(faces[i:i + batch].copy()).permute(0, 3, 1, 2)
            x = x.float() / 127.5 - 1
            part.append(ae.encode_raw(x.flip(-1) if mirror else x).half().numpy())
    return np.concatenate(part)


def _save(out: Path, **arrays: np.ndarray) -> Path:
    """Write the npz under a temporary name first: a killed run leaves no half cache."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
    return out


def at_frame_scale(faces: np.ndarray, scale: float) -> np.ndarray:
    """Faces as a video holds them when the face is ``scale`` times the crop's size in the
    frame: shrunk with area averaging (the camera) and cropped back up with the aligner's
    cubic warp (``vidanon.align.warp_crop``), so the crop has only the detail the frame had."""
    n, size = faces.shape[0], faces.shape[1]
    side = max(8, int(round(size * scale)))
    out = np.empty_like(faces)
    for i in range(n):
        small = cv2.resize(faces[i], (side, side), interpolation=cv2.INTER_AREA)
        out[i] = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return out


def encode_scaled_cache(data: str | Path, out: Path, scales: list[float],
                        resolution: int = 128, ae: TinyAutoencoder | None = None,
                        batch: int = 64, quiet: bool = False) -> Path:
    """Latents of the faces as small video faces (``at_frame_scale``), one array per scale.

    Why: a prior that only saw sharp faces completes a face with sharp texture inside a
    blurred crop of a small video face. That texture is lost when the face is pasted into
    the frame, recovery re-encodes a different latent and the keyed flip spreads the
    difference over the whole face. Trained also on these, a background-conditioned prior
    completes the face at the sharpness of its surroundings.
    """
    faces, names = load_dataset(data, resolution)
    ae = ae or load_taef2()
    arrays = {scale_key(s): _encode(ae, at_frame_scale(faces, s), batch, quiet, f"encode @{s}")
              for s in scales}
    return _save(out, names=np.array(names), scales=np.array(scales, np.float32), **arrays)


def scale_key(scale: float) -> str:
    return f"latents_s{round(scale * 100):03d}"


def load_scaled(path: str | Path) -> tuple[dict[float, np.ndarray], list[str]]:
    """Per frame scale, raw latents (N, C, h, w) float16 of the faces at that scale; names."""
    with np.load(path) as z:
        scales = [round(float(s), 4) for s in z["scales"]]
        return {s: z[scale_key(s)] for s in scales}, [str(n) for n in z["names"]]


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
    """``python -m vidanon.prior.latents FACES.npz OUT.npz [--scales 0.3 0.5]``: build the
    latent cache (with ``--scales``: the small-video-face cache instead)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vidanon.prior.latents")
    ap.add_argument("faces")
    ap.add_argument("out", type=Path)
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="frame scales (face size / crop size) for a small-face cache")
    a = ap.parse_args()
    if a.scales:
        encode_scaled_cache(a.faces, a.out, a.scales)
    else:
        encode_cache(a.faces, a.out)


if __name__ == "__main__":
    main()
