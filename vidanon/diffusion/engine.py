"""Keyed, reversible face replacement: masked DDIM inversion, sign flip, masked DDIM sampling.

Why this is not the reference method's loop:

* **Symmetric background.**  The background trajectory re-injected outside the face mask is
  the DDIM inversion of a *background-only* image (the face region filled from its
  surroundings).  Original and anonymized crops share their background pixels, so both
  directions compute the same trajectory; the reference re-inverts the anonymized image and
  gets a different one, which is why its recovery is not an inverse. A background-conditioned
  prior (``vidanon.prior.inpaint``) is also *shown* that background latent as its condition,
  and its trajectory is the background noised forward with a fixed public pattern
  (``noised_background``).
* **Exact inversion of the masked sampler.**  Sampling with re-injection is
  ``z_{k+1} = m * step(z_k, eps(z_k)) + (1 - m) * bg_{k+1}``.  Inversion solves that equation
  for ``z_k`` by fixed-point iteration (``refine`` extra UNet calls per step) instead of
  reusing ``eps(z_{k+1})``, so ``sample(invert(x))`` returns ``x`` up to the iteration error.
* **Keyed flip at a temperature, around the track's anchor.**  Inside the face mask
  ``anonymize`` maps the inverted noise ``z`` to ``a * flip(z) + b * n`` and ``recover`` maps
  it back, ``flip(z - b * n) / a``, with a ±1 flip and a standard normal ``n`` both drawn from
  the track key, ``a = tau * sqrt(1 - w)`` and ``b = tau * sqrt(w)``. With ``tau`` = 1 and
  ``w`` = 0 this is the reference method's flip, an involution.
  ``tau`` (temperature): a weak prior completes a face region from unit-variance noise
  poorly and from scaled-down noise more often as a face (reduced-temperature sampling, as in
  Glow's and BigGAN's truncation).
  ``w`` (anchor): the share of the noise's variance that is the same in every frame of a
  track. The flipped term follows the frame (pose, expression, blur); the anchor term does
  not, so the pseudo-identity drifts less between frames (IDDiffuse's consistent identity
  mapping), and less of the original reaches the output at all.
  Both are public and exactly invertible given the key; they cost recovery a ``1 / a``
  amplification of the re-encoding error (docs/prior.md).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vidanon.diffusion.ddim import DDIM
from vidanon.diffusion.framefit import FrameGeometry, ThroughFrame, fit_to_frame
from vidanon.diffusion.keyed import mean_keeping_flip
from vidanon.diffusion.models import FaceModel
from vidanon.keys import Key, anchor_noise, flip_signs
from vidanon.prior.inpaint import condition

BACKGROUND_NOISE_SEED = 20261207  # public: the same background noise for every crop and key


@dataclass
class EngineSettings:
    steps: int = 25
    refine: int = 2  # fixed-point iterations per inversion step (0 = plain DDIM inversion)
    strength: float = 1.0  # noisiest level as a fraction of the schedule (img2img strength)
    temperature: float = 1.0  # overall scale of the face noise after anonymization (tau)
    anchor: float = 0.0  # share of its variance from the track's key-derived noise (w)
    keep_mean: float = 0.0  # 0: the reference ±1 flip; in (0, 1]: mean-keeping flip (keyed.py)
    frame_fit: int = 0  # Adam steps fitting anonymized crops to their frames (framefit.py)
    tol: float = 0.0  # stop refining a level once every crop's RMS residual is below this
    batch_size: int = 32
    fill_sigma: float = 0.12  # background fill blur, as a fraction of the crop side
    compile: bool = False  # torch.compile the UNet (CUDA only; pays off on long videos)


def _gauss_kernel(sigma: float, device, dtype) -> torch.Tensor:
    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, device=device, dtype=dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gauss_kernel(sigma, x.device, x.dtype)
    c = x.shape[1]
    r = (k.numel() - 1) // 2
    kx = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kx.transpose(2, 3), groups=c)


def background_fill(x: torch.Tensor, mask: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Replace the masked region by a normalised blur of what lies outside it.

    Depends only on pixels outside the mask, so an original crop and its anonymized version
    (identical there) get the same filled image and hence the same background trajectory.
    """
    keep = 1.0 - mask
    num = _blur(x * keep, sigma_px)
    den = _blur(keep, sigma_px).clamp_min(1e-3)
    return x * keep + (num / den) * mask


def anderson(g, u: torch.Tensor, iters: int, history: int = 3, tol: float = 0.0) -> torch.Tensor:
    """Solve ``u = g(u)`` with Anderson acceleration, one small least-squares per sample.

    ``g(u_rows, idx)`` maps the rows ``idx`` of the batch (all rows when ``idx`` is None).

    Plain iteration ``u <- g(u)`` converges slowly, or not at all, where the model's noise
    prediction is steep (an under-trained prior, or the off-manifold latents of a
    sign-flipped face), and recovery inherits whatever residual is left. Mixing the last
    ``history`` iterates reaches the same residual in about two thirds of the UNet calls.
    Per-sample coefficients keep results independent of how crops are batched. With ``tol``
    > 0 a sample is frozen once its RMS residual ``|g(u) - u|`` is below it, and the loop
    ends when all are; freezing per sample, not per batch, keeps the result of a crop
    independent of its batch mates.
    """
    xs: list[torch.Tensor] = []
    gs: list[torch.Tensor] = []
    frozen: torch.Tensor | None = None  # per sample: converged, value fixed
    view = (-1,) + (1,) * (u.dim() - 1)
    for _ in range(iters):
        if frozen is None:
            gu = g(u, None)
        else:  # only the samples still moving cost a UNet evaluation
            idx = (~frozen).nonzero().squeeze(1)
            gu = u.clone()
            gu[idx] = g(u[idx], idx)
        if tol > 0:
            res = (gu - u).flatten(1).pow(2).mean(1).sqrt()
            frozen = res < tol if frozen is None else frozen | (res < tol)
            if bool(frozen.all()):
                return gu
        xs, gs = (xs + [u])[-history:], (gs + [gu])[-history:]
        if len(xs) == 1:
            u = gu
            continue
        n = u.shape[0]
        G = torch.stack(gs, 1).reshape(n, len(gs), -1).double()
        F = G - torch.stack(xs, 1).reshape(n, len(xs), -1).double()
        dF, dG = F[:, 1:] - F[:, :-1], G[:, 1:] - G[:, :-1]
        A = dF @ dF.transpose(1, 2)
        A = A + (1e-10 * A.diagonal(dim1=1, dim2=2).mean(-1) + 1e-30)[:, None, None] * torch.eye(
            A.shape[-1], dtype=A.dtype, device=A.device)
        gamma = torch.linalg.solve(A, dF @ F[:, -1].unsqueeze(-1))
        mixed = (G[:, -1] - (gamma * dG).sum(1)).to(u.dtype).reshape(u.shape)
        u = mixed if frozen is None else torch.where(frozen.view(view), gs[-1], mixed)
    return u


class Inversions:
    """Inverted crops kept between engine calls, by the crop's and mask's bytes (LRU).

    The inversion (background trajectory + masked inversion) is 80-90 % of a crop's UNet
    calls and depends on the crop and the mask only, not on the key. The privacy guard tries
    a larger mask and then a new key on the same frames of a track: with this memo the key
    step only samples and decodes them again.
    """

    def __init__(self, max_bytes: int = 128 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._items: OrderedDict[bytes, tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()

    @staticmethod
    def key(crop: torch.Tensor, mask: torch.Tensor) -> bytes:
        h = hashlib.blake2b(crop.numpy().tobytes(), digest_size=16)
        h.update(mask.numpy().tobytes())
        return h.digest()

    def get(self, key: bytes) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return item

    def put(self, key: bytes, zT: torch.Tensor, bg: list[torch.Tensor]) -> None:
        size = zT.numel() * zT.element_size() * (1 + len(bg))
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = (zT, bg)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (z, b) = self._items.popitem(last=False)
            self.bytes -= z.numel() * z.element_size() * (1 + len(b))


class Engine:
    """Batched anonymize / recover over aligned crops with one shared code path.

    ``inversions``: a memo shared between engines (the privacy guard's probes); None keeps
    nothing, as a video pass never transforms the same crop twice.
    """

    def __init__(self, model: FaceModel, settings: EngineSettings | None = None,
                 inversions: Inversions | None = None) -> None:
        self.model = model
        self.settings = settings or EngineSettings()
        self.inversions = inversions
        self.ddim = DDIM(model.scheduler, self.settings.steps, self.settings.strength)
        self._flip_cache: dict[str, torch.Tensor] = {}
        self._anchor_cache: dict[str, torch.Tensor] = {}
        self._bg_noise: torch.Tensor | None = None
        self.evals = 0  # UNet evaluations summed over crops (inversion varies with tol)
        self.crops = 0
        if self.settings.compile and model.device.type == "cuda":
            model.unet = torch.compile(model.unet)

    # -- public API -------------------------------------------------------------------------

    def anonymize(self, crops: torch.Tensor, masks: torch.Tensor, keys: Sequence[Key],
                  geoms: Sequence[FrameGeometry | None] | None = None):
        """Crops (N,3,S,S) in [-1,1], masks (N,1,S,S) in {0,1}, one key per crop. ``geoms``:
        where each crop will be pasted, for ``settings.frame_fit`` (None: not fitted)."""
        return self._batched(crops, masks, keys, forward=True, geoms=geoms)

    def recover(self, crops: torch.Tensor, masks: torch.Tensor, keys: Sequence[Key]):
        """The inverse: the anchor taken away, the same ±1 flip, the scale divided out."""
        return self._batched(crops, masks, keys, forward=False)

    def roundtrip(self, crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """invert -> sample with no flip; its error bounds what recovery can reach."""
        return self._batched(crops, masks, None, forward=True)

    @property
    def mix(self) -> tuple[float, float]:
        """(a, b): the flipped noise's and the anchor's weights inside the face mask."""
        tau, w = self.settings.temperature, self.settings.anchor
        return tau * (1.0 - w) ** 0.5, tau * w**0.5

    def keyed_noise(self, zT: torch.Tensor, m: torch.Tensor, keys: Sequence[Key],
                    forward: bool) -> torch.Tensor:
        """The keyed map of the inverted noise (``forward``) or its inverse, inside ``m``."""
        a, b = self.mix
        s = self.flips(keys).to(zT.device)
        n = self.anchors(keys).to(zT.device) if b else torch.zeros_like(zT)
        keep = self.settings.keep_mean
        if forward:
            flipped = mean_keeping_flip(zT, s, m, keep) if keep else s * zT
            inside = a * flipped + b * n
        else:
            y = (zT - b * n) / a
            inside = mean_keeping_flip(y, s, m, keep, inverse=True) if keep else s * y
        return m * inside + (1 - m) * zT

    @property
    def unet_calls_per_crop(self) -> int:
        """The most a crop can cost; with ``tol`` the inversion usually stops well before."""
        s = self.settings
        background = 0 if self.model.conditioned else s.steps
        return s.steps * (1 + s.refine) + s.steps + background  # invert + sample + background

    @property
    def mean_unet_calls_per_crop(self) -> float:
        """What crops transformed so far actually cost, on average."""
        return self.evals / max(self.crops, 1)

    # -- internals --------------------------------------------------------------------------

    def _batched(self, crops, masks, keys, forward: bool, geoms=None):
        if keys is not None and len(keys) != len(crops):
            raise ValueError("one key per crop is required")
        out = []
        bs = self.settings.batch_size
        for i in range(0, len(crops), bs):
            k = None if keys is None else keys[i : i + bs]
            g = None if geoms is None else geoms[i : i + bs]
            out.append(self._transform(crops[i : i + bs], masks[i : i + bs], k, forward, g))
        if not out:
            return crops.clone()
        return torch.cat(out)

    def latent_mask(self, masks: torch.Tensor) -> torch.Tensor:
        h = self.model.spec.latent_shape[1]
        m = F.interpolate(masks.float(), size=(h, h), mode="area")
        return (m > 0.5).float()

    def flips(self, keys: Sequence[Key]) -> torch.Tensor:
        return self._per_key(self._flip_cache, flip_signs, keys)

    def anchors(self, keys: Sequence[Key]) -> torch.Tensor:
        return self._per_key(self._anchor_cache, anchor_noise, keys)

    def _per_key(self, cache: dict[str, torch.Tensor], draw, keys: Sequence[Key]) -> torch.Tensor:
        """One latent-shaped draw per key, kept by key ID: a track's frames share it."""
        shape = tuple(self.model.spec.latent_shape)
        for key in keys:
            if key.id not in cache:
                cache[key.id] = torch.from_numpy(draw(key, shape))
        return torch.stack([cache[key.id] for key in keys])

    def _eps(self, z: torch.Tensor, k: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.evals += z.shape[0]
        return self.model.eps(z, self.ddim.timesteps[k], cond).float()

    def condition(self, bg: list[torch.Tensor], m: torch.Tensor) -> torch.Tensor | None:
        """What a background-conditioned prior is shown: the background-only latent outside
        the mask (``bg[-1]``, level 0), the same for a crop and its anonymized version."""
        return condition(bg[-1], m) if self.model.conditioned else None

    @torch.no_grad()
    def background_trajectory(self, zbg: torch.Tensor) -> list[torch.Tensor]:
        """Plain DDIM inversion of the background-only latent; index = level (a conditioned
        prior gets ``noised_background`` instead)."""
        if self.model.conditioned:
            return self.noised_background(zbg)
        traj = [zbg]
        z = zbg
        for k in reversed(range(self.ddim.steps)):
            z = self.ddim.unstep(z, self._eps(z, k), k)
            traj.append(z)
        return traj[::-1]

    def noised_background(self, zbg: torch.Tensor) -> list[torch.Tensor]:
        """A conditioned prior's background trajectory: the background noised forward with
        one fixed, public noise pattern, ``sqrt(a_k) * zbg + sqrt(1 - a_k) * n``.

        Inverting the background with such a prior is degenerate: shown the clean background
        as its condition, it predicts the noise outside the mask as whatever separates ``z``
        from it, which along the inversion is nothing, so the trajectory collapses to
        ``sqrt(a_k) * zbg``, a noiseless surrounding it never saw in training. Forward
        noising is what training showed it, costs no UNet call, and depends on the
        background only, so anonymization and recovery still share it.
        """
        shape = tuple(self.model.spec.latent_shape)
        if self._bg_noise is None or tuple(self._bg_noise.shape) != shape:
            g = torch.Generator().manual_seed(BACKGROUND_NOISE_SEED)
            self._bg_noise = torch.randn(shape, generator=g)
        n = self._bg_noise.to(zbg.device, zbg.dtype).unsqueeze(0)
        return [a**0.5 * zbg + (1 - a) ** 0.5 * n for a in self.ddim.alphas]

    @torch.no_grad()
    def invert(self, z0: torch.Tensor, m: torch.Tensor, bg: list[torch.Tensor]) -> torch.Tensor:
        """Solve the masked sampler backwards: level steps -> level 0."""
        z = z0 * m + bg[-1] * (1 - m)
        cond = self.condition(bg, m)
        eps = None
        for k in reversed(range(self.ddim.steps)):

            def g(u: torch.Tensor, idx: torch.Tensor | None, z=z, k=k) -> torch.Tensor:
                zz, mm, bk = (z, m, bg[k]) if idx is None else (z[idx], m[idx], bg[k][idx])
                cc = cond if cond is None or idx is None else cond[idx]
                return self.ddim.unstep(zz, self._eps(u, k, cc), k) * mm + bk * (1 - mm)

            # Warm start: the noise solved for at the previous level predicts this one's well
            # (it changes slowly with t): ~15 % fewer UNet calls at the same recovery PSNR.
            guess = z if eps is None else self.ddim.unstep(z, eps, k)
            z_next = z
            z = anderson(g, guess * m + bg[k] * (1 - m), 1 + self.settings.refine,
                         tol=self.settings.tol)
            eps = (z_next - self.ddim.c1[k] * z) / self.ddim.c2[k]
        return z

    @torch.no_grad()
    def sample(self, zT: torch.Tensor, m: torch.Tensor, bg: list[torch.Tensor]) -> torch.Tensor:
        z = zT
        cond = self.condition(bg, m)
        for k in range(self.ddim.steps):
            z = self.ddim.step(z, self._eps(z, k, cond), k) * m + bg[k + 1] * (1 - m)
        return z

    @torch.no_grad()
    def _invert_crops(self, x: torch.Tensor, masks: torch.Tensor):
        """Crops and pixel masks -> (inverted latents, background trajectory, latent mask)."""
        sigma = self.settings.fill_sigma * self.model.spec.crop_size
        filled = background_fill(x, masks, sigma)
        z0 = self.model.encode(x).float()
        zbg = self.model.encode(filled).float()
        m = self.latent_mask(masks)
        bg = self.background_trajectory(zbg)
        return self.invert(z0, m, bg), bg, m

    @torch.no_grad()
    def _inverted(self, x: torch.Tensor, masks: torch.Tensor):
        """``_invert_crops``, through the memo where there is one."""
        memo = self.inversions
        if memo is None:
            return self._invert_crops(x, masks)
        keys = [Inversions.key(x[i].cpu(), masks[i].cpu()) for i in range(x.shape[0])]
        found = [memo.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            zT, bg, _ = self._invert_crops(x[todo], masks[todo])
            for j, i in enumerate(todo):
                found[i] = (zT[j].clone(), [b[j].clone() for b in bg])
                memo.put(keys[i], *found[i])
        zT = torch.stack([f[0] for f in found])
        bg = [torch.stack([f[1][k] for f in found]) for k in range(len(found[0][1]))]
        return zT, bg, self.latent_mask(masks)

    @torch.no_grad()
    def _transform(self, x, masks, keys, forward: bool, geoms=None):
        model = self.model
        dev = model.device
        x = x.to(dev, torch.float32)
        self.crops += x.shape[0]
        masks = (masks.to(dev, torch.float32) > 0.5).float()
        zT, bg, m = self._inverted(x, masks)
        if keys is not None:
            zT = self.keyed_noise(zT, m, keys, forward)
        z = self.sample(zT, m, bg)
        if model.vae is None:
            return z.clamp(-1, 1).cpu()
        out = model.decode(z).float().clamp(-1, 1)
        if geoms is not None and self.settings.frame_fit > 0:
            out = self._fit(out, z, m, geoms)
        return out.cpu()

    def _fit(self, out: torch.Tensor, z: torch.Tensor, m: torch.Tensor,
             geoms: Sequence[FrameGeometry | None]) -> torch.Tensor:
        """``framefit``: the crops with a place in a frame, fitted so that recovery, reading
        them back from that frame, encodes the latent ``z`` they were decoded from."""
        idx = [i for i, g in enumerate(geoms) if g is not None]
        if not idx:
            return out
        through = ThroughFrame([geoms[i] for i in idx], self.model.spec.crop_size)
        out = out.clone()
        out[idx] = fit_to_frame(self.model.encode_differentiable, out[idx], z[idx], m[idx],
                                through, self.settings.frame_fit)
        return out


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, peak: float = 2.0,
         mask: torch.Tensor | np.ndarray | None = None) -> float:
    """PSNR in dB for images in [-1, 1] (peak 2), optionally only where mask is 1."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    d = (a - b) ** 2
    if mask is not None:
        w = torch.as_tensor(mask, dtype=torch.float64).expand_as(d)
        mse = (d * w).sum() / w.sum().clamp_min(1)
    else:
        mse = d.mean()
    return float(10 * torch.log10(peak**2 / mse.clamp_min(1e-20)))
