"""Fit an anonymized crop to the frame it is pasted into, so that recovery re-derives its latent.

Why: recovery starts from the anonymized face as the *frame* holds it. A face smaller in the
frame than the model's crop is pasted down and cut back up, which removes the texture finer
than the frame's pixels; the prior's replacement has such texture even where the original
had none, so recovery encodes another latent, and the keyed flip spreads the difference over
the whole face (``benchmarks/small_faces.py``: 65 % of faces 0.3 of the crop's size come
back, against 100 % at full size). Training the prior on small faces did not remove that
texture. Instead, the crop written to the frame is adjusted by gradient descent so that the
frame -> crop -> encoder path lands on the latent the sampler produced:

    min_c | E(U(paste(c))) - z |^2   inside the face's latent mask

``paste`` and ``U`` are the pipeline's own geometry (``vidanon.align.paste`` and
``warp_crop``: cubic warps through the face's crop matrix, the feathered alpha over the
original frame) rebuilt with ``grid_sample``, so they are differentiable. Nothing about the
key or the recovery changes: recovery still only reads the frame. The cost is an encoder
forward and backward pass per iteration and crop, so it is off by default on the CPU
(``diffusion.frame_fit``: the number of iterations).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from vidanon.align import _alpha_in_frame


@dataclass
class FrameGeometry:
    """Where one crop goes: its 2x3 frame -> crop matrix, the original frame's pixels around it
    (uint8 BGR, the box the paste touches) and the paste weight in that box."""

    matrix: np.ndarray
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the frame
    roi: np.ndarray  # (h, w, 3) uint8 BGR: the frame before the paste
    alpha: np.ndarray  # (h, w) float: paste weight in the box

    @classmethod
    def of(cls, frame: np.ndarray, matrix: np.ndarray, alpha: np.ndarray) -> FrameGeometry | None:
        """``alpha`` in crop space, as ``vidanon.align.paste`` takes it; None off-frame."""
        found = _alpha_in_frame(frame, matrix, alpha)
        if found is None:
            return None
        (x0, y0, x1, y1), _, a = found
        return cls(np.asarray(matrix, np.float64), (x0, y0, x1, y1),
                   frame[y0:y1, x0:x1].copy(), np.asarray(a, np.float32))


def shrinks(matrix: np.ndarray) -> bool:
    """Whether the paste shrinks the crop (the face is smaller in the frame than the crop):
    only then does the frame lose detail the fit could make up for."""
    return abs(float(np.linalg.det(np.asarray(matrix, np.float64)[:, :2]))) > 1.0


def _grid(pts: np.ndarray, w: int, h: int) -> torch.Tensor:
    """Pixel coordinates (..., 2) -> grid_sample's normalised coordinates (align_corners)."""
    g = np.empty_like(pts)
    g[..., 0] = 2 * pts[..., 0] / max(w - 1, 1) - 1
    g[..., 1] = 2 * pts[..., 1] / max(h - 1, 1) - 1
    return torch.from_numpy(g.astype(np.float32))


class ThroughFrame:
    """The differentiable path crop -> frame (paste) -> crop (``warp_crop``) for a batch."""

    def __init__(self, geoms: list[FrameGeometry], size: int) -> None:
        hs = [g.box[3] - g.box[1] for g in geoms]
        ws = [g.box[2] - g.box[0] for g in geoms]
        self.h, self.w = max(hs), max(ws)
        down, up, rois, alphas = [], [], [], []
        ii, jj = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                             indexing="xy")
        for g in geoms:
            x0, y0, x1, y1 = g.box
            u, v = np.meshgrid(np.arange(self.w, dtype=np.float64) + x0,
                               np.arange(self.h, dtype=np.float64) + y0, indexing="xy")
            down.append(_grid(_apply(g.matrix, u, v), size, size))  # frame px -> crop px
            p = _apply(cv2.invertAffineTransform(g.matrix), ii, jj) - [x0, y0]  # crop -> box
            up.append(_grid(p, self.w, self.h))
            roi = np.zeros((self.h, self.w, 3), np.float32)
            roi[: y1 - y0, : x1 - x0] = g.roi[..., ::-1] / 127.5 - 1  # BGR -> RGB, [-1, 1]
            a = np.zeros((self.h, self.w), np.float32)
            a[: y1 - y0, : x1 - x0] = g.alpha
            rois.append(torch.from_numpy(roi).permute(2, 0, 1))
            alphas.append(torch.from_numpy(a)[None])
        self.down = torch.stack(down)
        self.up = torch.stack(up)
        self.roi = torch.stack(rois)
        self.alpha = torch.stack(alphas)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        crops = _to_8bit(crops)  # the renderer hands paste 8-bit crops
        patch = F.grid_sample(crops, self.down.to(crops.device), mode="bicubic",
                              padding_mode="border", align_corners=True)
        a = self.alpha.to(crops.device)
        frame = _to_8bit(self.roi.to(crops.device) * (1 - a) + patch * a)  # an 8-bit frame
        return F.grid_sample(frame, self.up.to(crops.device), mode="bicubic",
                             padding_mode="border", align_corners=True)


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] pixels to 8-bit levels, passing gradients straight through: without it
    the fit spends itself on detail finer than a level, which the frame does not keep."""
    q = torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
    return x + (q - x).detach()


def _apply(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The 2x3 affine ``m`` at points (x, y): (..., 2)."""
    return np.stack([m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]],
                    -1)


def fit_to_frame(encode, crops: torch.Tensor, target: torch.Tensor, latent_mask: torch.Tensor,
                 through: ThroughFrame, iters: int, lr: float = 0.01) -> torch.Tensor:
    """Adjust ``crops`` so that ``encode(through(crops))`` approaches ``target`` inside the
    latent mask grown by one cell (the cells the face's latents reach). Adam, clamped to the
    pixel range; ``encode`` must be differentiable (the autoencoder's, not ``no_grad``)."""
    w = F.max_pool2d(latent_mask.float(), 3, stride=1, padding=1).to(target.device)
    c = crops.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            z = encode(through(c)).float()
            loss = ((z - target) * w).pow(2).sum() / w.sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                c.clamp_(-1, 1)
    return c.detach()
