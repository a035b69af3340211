"""A prior that sees the face's surroundings: background-conditioned (inpainting) UNets.

Why: the engine completes a face inside a fixed background by re-injecting the background's
trajectory outside the mask at every DDIM step. An unconditional prior learns nothing about
agreeing with a surrounding it never sees until late in sampling, and fills the oval with a
face in its own light and colours: the patch look (docs/prior.md, *Masked sampling*).
Stable Diffusion's inpainting models fix the same problem by giving the UNet the masked
image and the mask as extra input channels; this module does that for vidanon's priors.

The condition is a pure function of what lies *outside* the face mask, which original and
anonymized crops share, so anonymization and recovery see the same condition and the keyed
map stays exactly invertible. Input channels: ``[z_t, background * (1 - m'), m']`` with
``m'`` the latent face mask grown by one latent cell (the encoder's receptive field lets the
face leak a little into the latents at its border). An all-ones mask zeroes the background
and asks for an unconditional sample, so one model is both prior and inpainter; training
drops the condition that way for a share of each batch (``UNCOND_SHARE``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

UNCOND_SHARE = 0.1  # share of training examples with no background (an all-ones mask)
CENTRE_JITTER = 0.05  # face oval centre offset, crop fractions, each axis
RADIUS_RANGE = (0.75, 1.2)  # oval radius scale, each axis: FaceMesh masks, guard growth


def cond_channels(latent_channels: int) -> int:
    """Input channels of a conditioned UNet over ``latent_channels``-channel latents."""
    return 2 * latent_channels + 1


def is_conditioned(unet: UNet2DModel) -> bool:
    cfg = unet.config
    return int(cfg.in_channels) == cond_channels(int(cfg.out_channels))


def condition(background: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[background * (1 - m'), m']`` for latents (N,C,h,w) and a latent mask (N,1,h,w)."""
    grown = F.max_pool2d(mask.float(), 3, stride=1, padding=1)
    return torch.cat([background * (1 - grown), grown], dim=1)


def unconditional(z: torch.Tensor) -> torch.Tensor:
    """The condition that asks for a free sample: no background, mask everywhere."""
    n, _, h, w = z.shape
    return torch.cat([torch.zeros_like(z), torch.ones(n, 1, h, w, dtype=z.dtype,
                                                      device=z.device)], dim=1)


def train_masks(n: int, size: int, oval: Sequence[float], generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Random face ovals at latent resolution, (n, 1, size, size) in {0, 1}.

    Centred on the template's oval with jitter and scaled per axis, covering the engine's
    fixed oval, FaceMesh contours and the privacy guard's grown masks; cell centres inside
    the ellipse are 1, as the engine's area-downsampled mask thresholded at 0.5.
    ``UNCOND_SHARE`` of them are all ones (no background: the unconditional task).
    """
    cx, cy, rx, ry = (float(v) for v in oval)
    u = torch.rand(n, 5, generator=generator, device=device)
    ccx = cx + (2 * u[:, 0] - 1) * CENTRE_JITTER
    ccy = cy + (2 * u[:, 1] - 1) * CENTRE_JITTER
    lo, hi = RADIUS_RANGE
    rrx = rx * (lo + (hi - lo) * u[:, 2])
    rry = ry * (lo + (hi - lo) * u[:, 3])
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    dx = (c.view(1, 1, -1) - ccx.view(-1, 1, 1)) / rrx.view(-1, 1, 1)
    dy = (c.view(1, -1, 1) - ccy.view(-1, 1, 1)) / rry.view(-1, 1, 1)
    m = (dx**2 + dy**2 <= 1.0).float()
    m = torch.where((u[:, 4] < UNCOND_SHARE).view(-1, 1, 1), torch.ones_like(m), m)
    return m.unsqueeze(1)


def widen(unet: UNet2DModel) -> UNet2DModel:
    """An unconditional UNet turned into a conditioned one that starts out computing the same.

    The new input channels get zero weights (as Stable Diffusion's inpainting model was
    initialised from its text-to-image one), so training starts from the prior's skill and
    learns only what the background adds.
    """
    # Without the private keys: ``_use_default_values`` would reset in_channels to 3.
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    c = int(cfg["out_channels"])
    if int(cfg["in_channels"]) != c:
        raise ValueError("widen() takes an unconditional UNet (in_channels == out_channels)")
    cfg["in_channels"] = cond_channels(c)
    wide = UNet2DModel.from_config(cfg)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    grown = torch.zeros(w.shape[0], cond_channels(c), *w.shape[2:], dtype=w.dtype)
    grown[:, :c] = w
    state["conv_in.weight"] = grown
    wide.load_state_dict(state)
    return wide.to(next(unet.parameters()).device)
