"""The keyed map of a face's inverted noise: the reference method's sign flip, or one that
keeps the face's mean.

Why a second map: the noise's mean over the face mask, per latent channel, is what a latent
prior reads as the face's colour and light (at the noisiest DDIM level the signal still
carries ~0.5 of that mean's variance; the schedule's terminal SNR is not zero). The plain
±1 flip replaces it with a random mean, and the prior paints a face in a colour at odds with
its surroundings, which it cannot reconcile: smeared, incoherent texture, a patch. The
mean-keeping flip ``T = H D`` (the flip ``D``, then the Householder reflection ``H`` that
maps ``D u`` back to the mask's unit vector ``u``, per channel) scrambles everything
orthogonal to the mean exactly as a flip does and keeps the mean's direction, scaled by
``keep`` (0 < keep <= 1): at 1 it keeps the original's colour and light, lower values move
the face towards the training faces' average colour, which is what takes the last identity
out of it (``benchmarks/inpaint.py``, docs/prior.md). It is orthogonal up to that scale,
so recovery inverts it exactly (``T^-1 = D H``, the mean divided by ``keep``).
"""

from __future__ import annotations

import torch


def mask_unit(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask's unit vector per channel: the direction of a channel's mean over the mask."""
    return (m / m.sum((2, 3), keepdim=True).clamp_min(1).sqrt()).expand_as(like)


def mean_keeping_flip(z: torch.Tensor, s: torch.Tensor, m: torch.Tensor, keep: float = 1.0,
                      inverse: bool = False) -> torch.Tensor:
    """``H D z`` with the mask mean scaled by ``keep`` inside ``m`` (or the inverse).

    ``z`` (N,C,h,w) latents, ``s`` ±1 of the same shape, ``m`` (N,1,h,w) in {0, 1}; outside
    the mask ``z`` is returned as it is.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError("keep must be in (0, 1]")
    u = mask_unit(m, z)
    v = s * u - u
    vv = (v * v).sum((2, 3), keepdim=True).clamp_min(1e-12)

    def h(y: torch.Tensor) -> torch.Tensor:  # reflection swapping D u and u (symmetric)
        return y - 2 * v * (v * y).sum((2, 3), keepdim=True) / vv

    def scale_mean(y: torch.Tensor, f: float) -> torch.Tensor:
        return y + (f - 1.0) * (y * u).sum((2, 3), keepdim=True) * u

    inside = z * m
    y = s * h(scale_mean(inside, 1.0 / keep)) if inverse else scale_mean(h(s * inside), keep)
    return m * y + (1 - m) * z
