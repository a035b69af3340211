"""DDIM samples from an exported prior, as an image grid for eyeballing training progress.

Sampling goes through ``vidanon.diffusion.models.load_model`` and ``FaceModel.eps`` (the code
path the pipeline uses) rather than a diffusers pipeline, so the grid also checks that the
exported folder loads and runs the way vidanon will run it.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import DDIMScheduler

from vidanon.diffusion.models import load_model


@torch.no_grad()
def sample_faces(
    model_dir: str | Path, n: int = 64, steps: int = 50, seed: int = 0, batch: int = 32,
    temperature: float = 1.0,
) -> np.ndarray:
    """``n`` deterministic DDIM (eta = 0) samples as uint8 RGB (n, H, W, 3).

    ``temperature`` scales the starting noise, as the engine scales a face's flipped noise.
    The same seed gives the same noise at every temperature, so grids compare face by face.
    """
    model = load_model(str(model_dir), device="cpu")
    c, h, w = model.spec.latent_shape
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn((n, c, h, w), generator=g) * temperature
    outs = []
    for i in range(0, n, batch):
        x = x_all[i : i + batch]
        for t in sched.timesteps:
            eps = model.eps(x, int(t)).float()
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        outs.append(model.decode(x).float())
    x = torch.cat(outs).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tile(images: np.ndarray, cols: int | None = None, gap: int = 2) -> np.ndarray:
    """Tile (n, H, W, 3) images into one grid with white gaps."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = img
    return grid


def sample_grid(
    model_dir: str | Path, n: int = 64, steps: int = 50, seed: int = 0, temperature: float = 1.0
) -> np.ndarray:
    """A square-ish grid (8x8 for n = 64) of DDIM samples, uint8 RGB."""
    return tile(sample_faces(model_dir, n=n, steps=steps, seed=seed, temperature=temperature))


def save_png(image_rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 image as PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image_rgb[..., ::-1])):
        raise OSError(f"cannot write {path}")
    return path
