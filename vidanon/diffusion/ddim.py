"""Deterministic DDIM (sigma = 0) over a model's own noise schedule, in both directions.

diffusers' ``DDIMScheduler`` and ``DDIMInverseScheduler`` step one way each and keep state;
the engine needs a pure, batched step it can run forwards, backwards and inside a fixed-point
iteration, so only the schedule (``alphas_cumprod``, timesteps) is taken from diffusers and
the two update rules live here.

Levels: level 0 is the noisiest timestep, level ``steps`` is the clean sample.  A sampling
step goes level k -> k+1; inversion goes k+1 -> k.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler


class DDIM:
    """Timesteps and the affine DDIM update ``z_{k+1} = c1[k] * z_k + c2[k] * eps``."""

    def __init__(self, scheduler: DDIMScheduler, steps: int, strength: float = 1.0) -> None:
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if not 0.0 < strength <= 1.0:
            raise ValueError("strength must be in (0, 1]")
        sched = DDIMScheduler.from_config(scheduler.config)
        # As in diffusers' img2img: lay out steps/strength steps over the whole schedule and
        # keep the last `steps`, so the noisiest level sits at about strength * T.
        sched.set_timesteps(max(steps, round(steps / strength)))
        self.timesteps: list[int] = [int(t) for t in sched.timesteps][-steps:]
        ac = sched.alphas_cumprod.to(torch.float64)
        final = 1.0 if sched.config.set_alpha_to_one else float(ac[0])
        a = [float(ac[t]) for t in self.timesteps] + [final]
        self.alphas = a  # alpha_bar at each level, level `steps` is clean
        self.c1 = [(a[k + 1] / a[k]) ** 0.5 for k in range(steps)]
        self.c2 = [
            (1 - a[k + 1]) ** 0.5 - (a[k + 1] * (1 - a[k]) / a[k]) ** 0.5 for k in range(steps)
        ]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def step(self, z: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
        """Sampling: level k -> k + 1."""
        return self.c1[k] * z + self.c2[k] * eps

    def unstep(self, z_next: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
        """Inversion: level k + 1 -> k, exact when ``eps`` was evaluated at the result."""
        return (z_next - self.c2[k] * eps) / self.c1[k]
