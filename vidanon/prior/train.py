"""Training the offline face prior: a small pixel-space ``UNet2DModel`` on aligned face crops.

The prior is what vidanon's DDIM inversion and keyed sign flips run through, so it must (a) use
the exact noise schedule the pipeline samples with (the DDIM schedule below, also saved next to
the weights), (b) predict epsilon, and (c) be cheap enough on a CPU to run 2 x 50 UNet passes
per face crop.  The recipe is plain DDPM training (uniform timesteps, MSE on epsilon), AdamW
with linear warm-up, gradient clipping and an EMA of the weights, which is what gets exported.

Runs are resumable bit for bit: the data order, flips, timesteps and noise of every step are
pure functions of (seed, step), and checkpoints hold the model, EMA, optimizer state and RNG
state.  ``time_limit_s`` stops cleanly with a checkpoint, for fixed-length GPU slices.

CLI::

    python -m vidanon.prior.train --data ../shared/data/faces/utkface_crop64.npz \
        --out runs/prior-cpu --preset cpu --batch-size 32 --time-limit-s 4500
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from tqdm import tqdm

from vidanon.prior.autoencoder import DOWNSCALE
from vidanon.prior.checkpoint import (
    CKPT_BYTES,
    SHARD_BYTES,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from vidanon.prior.data import (
    HELDOUT_RULE,
    batch_indices,
    flip_mask,
    load_dataset,
    split_indices,
)
from vidanon.prior.inpaint import cond_channels, condition, train_masks, widen
from vidanon.prior.latents import channel_stats, is_latent_cache, load_latents, load_scaled

NUM_TRAIN_TIMESTEPS = 1000
EXPORT_BYTES = 48_000_000
LICENCE = "UTKFace-derived: non-commercial research use only"

# (block_out_channels, layers_per_block, attention per resolution level, norm groups, head dim)
# "cpu" was picked by measuring CPU inference (see docs/prior.md): channel width at the 64 px
# level dominates the cost, so it starts at 16 channels and puts attention only at 16 and 8 px.
# "gpu" is sized so its fp16 export (19 MB) and a light checkpoint (56 MB) fit the transfer
# limits of a GPU lease; the (64,128,256,256) x2 layout would export at 53 MB.
PRESETS: dict[str, dict] = {
    "tiny": {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "attention": (False, True),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
    "cpu": {
        "block_out_channels": (16, 32, 64, 128),
        "layers_per_block": 1,
        "attention": (False, False, True, True),
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    },
    # Latent prior over 32x16x16 TAEF2 latents: three levels (16, 8, 4 positions), attention
    # at 8 and 4; 6.8 M parameters, so its fp16 export (13.7 MB) fits one 16 MB file, and about
    # 1.2 s per batch-32 training step on one CPU thread.
    "latent": {
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 2,
        "attention": (False, True, True),
        "norm_num_groups": 32,
        "attention_head_dim": 32,
    },
    "gpu": {
        "block_out_channels": (64, 128, 128, 128),
        "layers_per_block": 2,
        "attention": (False, False, True, True),
        "norm_num_groups": 32,
        "attention_head_dim": 32,
    },
}


def build_unet(preset: str, resolution: int, channels: int = 3,
               in_channels: int | None = None) -> UNet2DModel:
    """A freshly initialised UNet of a named preset for square inputs of ``resolution`` px
    (pixels, or latent positions for a latent prior) with ``channels`` channels
    (``in_channels`` more for a background-conditioned prior, ``vidanon.prior.inpaint``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    levels = len(p["block_out_channels"])
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} is not divisible by {2 ** (levels - 1)}")
    attn = p["attention"]
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels or channels,
        out_channels=channels,
        block_out_channels=tuple(p["block_out_channels"]),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=p["layers_per_block"],
        norm_num_groups=p["norm_num_groups"],
        attention_head_dim=p["attention_head_dim"],
    )


def make_scheduler(latent: bool = False) -> DDIMScheduler:
    """The noise schedule the prior is trained with and that the pipeline samples with.

    Latent priors use Stable Diffusion's scaled-linear betas (0.00085..0.012): the noisiest
    level keeps alpha_bar 0.0047 (the reference LDM's 0.0015..0.0195 keeps 1.4e-4, pixel
    DDPM's 4e-5), so DDIM inversion amplifies a re-encoded latent's error 15x at most
    instead of 84x or 160x, which is what recovery from an 8-bit video frame needs.
    """
    if latent:
        return DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                             beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, clip_sample=False, set_alpha_to_one=True)
    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=True,
    )


def diffusion_loss(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDPM epsilon-prediction MSE: noise ``x0`` to step ``t`` and ask the UNet for the noise
    (given ``cond``, extra input channels, for a background-conditioned prior)."""
    a = alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = unet(xt if cond is None else torch.cat([xt, cond], 1), t).sample
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint and in ``train_config.json``."""

    data: str
    resolution: int
    preset: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    ema_decay: float
    warmup_steps: int
    grad_clip: float
    weight_decay: float
    ckpt_mode: str
    n_train: int
    n_heldout: int
    heldout_rule: str = HELDOUT_RULE
    inpaint: bool = False  # background-conditioned (vidanon.prior.inpaint)
    # Share of each batch drawn from ``scaled`` (faces as small video faces, latents.py);
    # may change on resume (an augmentation, not the model's shape): ``history`` says when.
    small_faces: float = 0.0
    scaled: str = ""


def small_face_draw(batch_size: int, seed: int, step: int, share: float, n_scales: int,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Which faces of a step's batch come at a small frame scale, and at which (index); a
    pure function of (seed, step) like ``flip_mask``, so resuming continues the same draw."""
    rng = np.random.default_rng([seed, step, 0x5CA1E])
    return rng.random(batch_size) < share, rng.integers(0, max(n_scales, 1), batch_size)


def _stream_seed(seed: int, step: int) -> int:
    # Distinct, reproducible torch RNG stream per step (timesteps + noise).
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _ckpt_mode(mode: str, n_params: int) -> str:
    if mode != "auto":
        return mode
    return "full" if 16 * n_params <= CKPT_BYTES else "light"


def _state_tensors(
    model: UNet2DModel, ema: UNet2DModel, opt: torch.optim.Optimizer | None, mode: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        out[f"model.{k}"] = v.float()
    ema_dtype = torch.float32 if mode == "full" else torch.float16
    for k, v in ema.state_dict().items():
        out[f"ema.{k}"] = v.to(ema_dtype)
    if mode == "full" and opt is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                for sk, sv in opt.state.get(p, {}).items():
                    out[f"opt.{names[id(p)]}.{sk}"] = sv
    return out


def _load_optimizer(
    opt: torch.optim.Optimizer, model: UNet2DModel, tensors: dict[str, torch.Tensor], groups
) -> bool:
    """Restore AdamW state from checkpoint tensors; False if the checkpoint has none."""
    if not any(k.startswith("opt.") for k in tensors):
        return False
    sd = opt.state_dict()
    params = dict(model.named_parameters())
    order = [n for n, p in params.items() if p.requires_grad]
    state = {}
    for i, n in enumerate(order):
        entry = {
            sk.rsplit(".", 1)[-1]: v
            for sk, v in tensors.items()
            if sk.startswith(f"opt.{n}.") and "." not in sk[len(f"opt.{n}.") :]
        }
        if entry:
            state[i] = entry
    for g_new, g_old in zip(sd["param_groups"], groups, strict=True):
        g_new.update({k: v for k, v in g_old.items() if k != "params"})
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return True


def _data_label(data: str | Path) -> str:
    return Path(data).name


def train_prior(
    data: str | Path,
    out: Path,
    resolution: int = 64,
    preset: str = "cpu",
    steps: int = 100_000,
    batch_size: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
    resume: Path | None = None,
    device: str = "auto",
    ema_decay: float = 0.999,
    checkpoint_every: int = 1000,
    time_limit_s: float | None = None,
    compile: bool = False,
    quiet: bool = False,
    *,
    checkpoint_every_s: float | None = None,
    warmup_steps: int = 200,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
    ckpt_mode: str = "auto",
    log_every: int = 50,
    shard_bytes: int = SHARD_BYTES,
    inpaint: bool = False,
    init_from: Path | None = None,
    face_oval: Sequence[float] | None = None,
    scaled: str | Path | None = None,
    small_faces: float = 0.0,
) -> Path:
    """Train (or resume training) a face prior; returns the newest checkpoint folder.

    ``steps`` is the total step count of the run (a resumed run continues up to it).  A
    checkpoint is written every ``checkpoint_every`` steps and/or ``checkpoint_every_s``
    seconds, at the end, and when ``time_limit_s`` (wall time of this call's training loop)
    is about to run out.  ``ckpt_mode`` "full" stores fp32 model, EMA and AdamW state (exact
    resume); "light" stores fp32 model and fp16 EMA only (resume restarts AdamW with a fresh
    warm-up) for models whose full checkpoint would exceed 60 MB; "auto" picks by size.

    ``inpaint`` trains a background-conditioned prior (``vidanon.prior.inpaint``) on random
    face ovals around ``face_oval`` (default: ``out/template.json``'s); ``init_from`` starts
    it from an unconditional checkpoint's weights, widened, at step 0. ``scaled`` (a cache of
    ``latents.encode_scaled_cache``) and ``small_faces`` draw that share of each batch as
    small video faces, at one of the cache's frame scales.
    """
    t_start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _resolve_device(device)

    latent = is_latent_cache(data)
    latent_stats: dict | None = None
    if latent:  # TAEF2 latents (N, C, h, w), normalised per channel with train-split stats
        lat, lat_flip, names = load_latents(data)
        train_idx, held_idx = split_indices(names)
        shift, scale = channel_stats(lat[train_idx])
        latent_stats = {"shift": shift, "scale": scale}
        sh = torch.tensor(shift).view(1, -1, 1, 1)
        sc = torch.tensor(scale).view(1, -1, 1, 1)
        lat_t = ((torch.from_numpy(lat).float() - sh) / sc).to(dev)
        # A mirrored latent is not the latent of the mirrored face: without encoded mirror
        # images there is no flip augmentation.
        lat_flip_t = lat_t if lat_flip is None else (
            (torch.from_numpy(lat_flip).float() - sh) / sc).to(dev)
        channels = lat.shape[1]
        scaled_t = None
        if small_faces > 0:
            if scaled is None:
                raise ValueError("small_faces needs a cache of small faces (scaled)")
            by_scale, scaled_names = load_scaled(scaled)
            if scaled_names != names:
                raise ValueError(f"{scaled} holds other faces than {data}")
            scaled_t = torch.stack([(torch.from_numpy(v).float() - sh) / sc
                                    for v in by_scale.values()]).to(dev)
        if lat.shape[-1] != resolution:
            raise ValueError(f"latents are {lat.shape[-1]} px, not --resolution {resolution}")
    else:
        faces, names = load_dataset(data, resolution)
        train_idx, held_idx = split_indices(names)
        faces_t = torch.from_numpy(faces).to(dev)  # uint8 NHWC, ~120 MB for 9,780 64-px faces
        channels = 3
    if len(train_idx) < batch_size:
        raise ValueError(f"only {len(train_idx)} training faces for batch size {batch_size}")

    ckpt_tensors: dict[str, torch.Tensor] | None = None
    ckpt_meta: dict | None = None
    if resume is not None:
        ckpt_tensors, ckpt_meta = load_checkpoint(Path(resume))
        old = ckpt_meta["config"]
        for key, new in (
            ("preset", preset),
            ("resolution", resolution),
            ("batch_size", batch_size),
            ("seed", seed),
            ("data", _data_label(data)),
            ("inpaint", inpaint),
        ):
            was = old.get(key, False)  # runs from before ``inpaint`` existed: False
            if was != new:
                raise ValueError(f"resume: {key} was {was!r} in the checkpoint, now {new!r}")

    with torch.random.fork_rng(devices=[]):  # init from the seed, leave global RNG alone
        torch.manual_seed(seed)
        model = build_unet(preset, resolution, channels,
                           cond_channels(channels) if inpaint else None)
    oval: list[float] | None = None
    if inpaint:
        if face_oval is None:
            face_oval = json.loads((out / "template.json").read_text())["face_oval"]
        oval = [float(v) for v in face_oval]
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        data=_data_label(data),
        resolution=resolution,
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        ema_decay=ema_decay,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
        weight_decay=weight_decay,
        ckpt_mode=_ckpt_mode(ckpt_mode, n_params),
        n_train=len(train_idx),
        n_heldout=len(held_idx),
        inpaint=inpaint,
        small_faces=small_faces,
        scaled=_data_label(scaled) if small_faces > 0 and scaled is not None else "",
    )
    if cfg.ckpt_mode == "full" and 16 * n_params > CKPT_BYTES:
        warnings.warn(
            f"full checkpoints of {16 * n_params / 1e6:.0f} MB exceed {CKPT_BYTES / 1e6:.0f} MB",
            stacklevel=2,
        )
    ema = copy.deepcopy(model).requires_grad_(False)
    history: list[dict] = list(ckpt_meta.get("history", [])) if ckpt_meta else []
    init_info: dict | None = ckpt_meta.get("init_from") if ckpt_meta else None
    step = 0
    if ckpt_tensors is not None and ckpt_meta is not None:
        model.load_state_dict({k[6:]: v for k, v in ckpt_tensors.items() if k.startswith("model.")})
        ema.load_state_dict(
            {k[4:]: v.float() for k, v in ckpt_tensors.items() if k.startswith("ema.")}
        )
        step = int(ckpt_meta["step"])
    elif init_from is not None:  # an unconditional prior's EMA weights, widened
        base_t, base_meta = load_checkpoint(Path(init_from))
        base = UNet2DModel.from_config(base_meta["unet_config"])
        base.load_state_dict({k[4:]: v.float() for k, v in base_t.items() if k.startswith("ema.")})
        base = widen(base) if inpaint else base
        model.load_state_dict(base.state_dict())
        ema.load_state_dict(base.state_dict())
        init_info = {"path": str(init_from), "step": int(base_meta["step"])}
    model.to(dev).train()
    ema.to(dev).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm_from = 0
    if ckpt_tensors is not None and ckpt_meta is not None:
        restored = _load_optimizer(opt, model, ckpt_tensors, ckpt_meta["param_groups"])
        if not restored:
            warm_from = step  # light checkpoint: AdamW restarts, so warm up again
        if ckpt_meta.get("torch_rng"):
            torch.set_rng_state(_unb64(ckpt_meta["torch_rng"]))
        if dev.type == "cuda" and ckpt_meta.get("cuda_rng"):
            torch.cuda.set_rng_state(_unb64(ckpt_meta["cuda_rng"]))
        warm_from = int(ckpt_meta.get("warm_from", 0)) if restored else warm_from
        del ckpt_tensors
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))

    fwd: torch.nn.Module = model
    if compile and dev.type == "cuda":
        fwd = torch.compile(model)  # type: ignore[assignment]
    alphas_cumprod = make_scheduler(latent).alphas_cumprod.to(dev, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [p for p in ema.parameters()]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def checkpoint() -> Path:
        meta = {
            "step": step,
            "config": asdict(cfg),
            "unet_config": dict(model.config),
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
            ],
            "warm_from": warm_from,
            "torch_rng": _b64(torch.get_rng_state()),
            "cuda_rng": _b64(torch.cuda.get_rng_state()) if dev.type == "cuda" else "",
            "history": history,
            "init_from": init_info,
            "latent_stats": latent_stats,
            "device": str(dev),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        tensors = _state_tensors(model, ema, opt, cfg.ckpt_mode)
        return save_checkpoint(out / "ckpt", step, tensors, meta, shard_bytes=shard_bytes)

    last_ckpt: Path | None = None
    t_loop = time.monotonic()
    t_last_ckpt = t_loop
    loss_sum = torch.zeros((), device=dev)
    n_sum = 0
    t_log = t_loop
    step_times: list[float] = []
    bar = tqdm(
        total=steps, initial=step, disable=quiet, dynamic_ncols=True, mininterval=5.0,
        desc=f"prior[{preset}]",
    )
    stopped_by_time = False
    while step < steps:
        t0 = time.monotonic()
        idx = torch.from_numpy(batch_indices(train_idx, batch_size, seed, step)).to(dev)
        flips = torch.from_numpy(flip_mask(batch_size, seed, step)).to(dev)
        if latent:
            x0 = torch.where(flips.view(-1, 1, 1, 1), lat_flip_t[idx], lat_t[idx])
            if scaled_t is not None:  # small faces are not mirrored: no mirrored cache
                small, which = small_face_draw(batch_size, seed, step, small_faces,
                                               scaled_t.shape[0])
                sel = torch.from_numpy(small).to(dev).view(-1, 1, 1, 1)
                x0 = torch.where(sel, scaled_t[torch.from_numpy(which).to(dev), idx], x0)
        else:
            x0 = faces_t[idx].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            x0 = torch.where(flips.view(-1, 1, 1, 1), x0.flip(-1), x0)
        g = torch.Generator(device=dev).manual_seed(_stream_seed(seed, step))
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=g, device=dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        cond = None
        if oval is not None:  # after the noise: the step's stream stays as it was
            masks = train_masks(batch_size, resolution, oval, g, dev)
            cond = condition(x0, masks)

        lr_now = lr * min(1.0, (step - warm_from + 1) / max(1, warmup_steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        with autocast:
            loss = diffusion_loss(fwd, x0, noise, t, alphas_cumprod, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        # EMA with the usual warm-up so short runs are not dominated by the random init.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        step += 1
        loss_sum += loss.detach()
        n_sum += 1
        step_times.append(time.monotonic() - t0)

        if step % log_every == 0 or step == steps:
            now = time.monotonic()
            mean = float(loss_sum) / n_sum
            if not math.isfinite(mean):
                raise FloatingPointError(f"loss became {mean} at step {step}")
            rec = {
                "step": step,
                "loss": round(mean, 5),
                "lr": lr_now,
                "steps_per_s": round(n_sum / max(now - t_log, 1e-9), 4),
                "elapsed_s": round(now - t_loop, 1),
            }
            if small_faces > 0:
                rec["small_faces"] = small_faces
            history.append(rec)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr_now:.1e}")
            loss_sum.zero_()
            n_sum = 0
            t_log = now
        bar.update(1)

        now = time.monotonic()
        due = step % checkpoint_every == 0 or (
            checkpoint_every_s is not None and now - t_last_ckpt >= checkpoint_every_s
        )
        if time_limit_s is not None:
            recent = step_times[-20:]
            est = sum(recent) / len(recent)
            if now - t_start + 2 * est >= time_limit_s and step < steps:
                stopped_by_time = True
        if due or stopped_by_time or step == steps:
            last_ckpt = checkpoint()
            t_last_ckpt = time.monotonic()
        if stopped_by_time:
            break
    bar.close()
    if last_ckpt is None:  # resumed at or past ``steps``: nothing to train
        last_ckpt = checkpoint()
    if not quiet:
        why = "time limit" if stopped_by_time else "done"
        print(f"prior: {why} at step {step}, checkpoint {last_ckpt}", file=sys.stderr)
    return last_ckpt


def face_oval_from_template(template: Sequence[Sequence[float]]) -> list[float]:
    """Face oval (cx, cy, rx, ry, crop fractions) from the 5-point template.

    From eye centre e and mouth centre m, d = |m - e|: the face centre sits a little below
    their midpoint and the oval spans about brows to chin and cheek to cheek.
    """
    pts = np.asarray(template, dtype=np.float64)
    e = pts[:2].mean(axis=0)
    m = pts[3:5].mean(axis=0)
    d = float(np.linalg.norm(m - e))
    oval = [(e[0] + m[0]) / 2, (e[1] + m[1]) / 2 + 0.15 * d, 0.95 * d, 1.1 * d]
    return [round(float(np.clip(v, 0.0, 1.0)), 4) for v in oval]


def _replace_dir(src: Path, dst: Path) -> None:
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def export_weights(
    run_dir: Path,
    dest: Path,
    template: Sequence[Sequence[float]],
    face_oval: Sequence[float] | None = None,
    *,
    name: str | None = None,
    extra_meta: dict | None = None,
    max_bytes: int = EXPORT_BYTES,
) -> Path:
    """Write the newest checkpoint's EMA weights as an fp16 diffusers model folder.

    Layout: ``dest/unet`` (config + fp16 safetensors), ``dest/scheduler`` (the training DDIM
    schedule) and ``dest/vidanon.json`` (crop size, template, oval, training facts, licence),
    which is what ``vidanon.diffusion.models.load_folder`` reads.  Existing ``unet``/
    ``scheduler`` folders are swapped out by rename, and other files in ``dest`` (the model
    card) are left alone.
    """
    tensors, meta = load_checkpoint(Path(run_dir))
    cfg = meta["config"]
    unet = UNet2DModel.from_config(meta["unet_config"])
    unet.load_state_dict({k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")})
    unet = unet.half().eval()
    template = [[round(float(x), 4), round(float(y), 4)] for x, y in template]
    if len(template) != 5:
        raise ValueError("template must have 5 points")
    oval = list(face_oval) if face_oval is not None else face_oval_from_template(template)
    res = int(cfg["resolution"])
    stats = meta.get("latent_stats")
    crop = res * DOWNSCALE if stats else res
    info = {
        "name": name or f"vidanon/face-prior-{'latent' if stats else ''}{crop}",
        "kind": "latent" if stats else "pixel",
        "crop_size": crop,
        "template": template,
        "face_oval": [round(float(v), 4) for v in oval],
        "training": {
            "steps": int(meta["step"]),
            "batch": int(cfg["batch_size"]),
            "preset": cfg["preset"],
            "data": cfg["data"],
            "heldout": cfg["heldout_rule"],
            "seed": int(cfg["seed"]),
            "lr": cfg["lr"],
            "ema_decay": cfg["ema_decay"],
            "device": meta.get("device", ""),
            "n_train": cfg["n_train"],
            "n_heldout": cfg["n_heldout"],
            "final_loss": meta["history"][-1]["loss"] if meta.get("history") else None,
        },
        "licence": LICENCE,
    }
    if stats:  # the autoencoder and the normalisation the UNet was trained under
        info["autoencoder"] = "taef2"
        info["latent_stats"] = stats
    if extra_meta:
        info.update(extra_meta)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        make_scheduler(bool(stats)).save_pretrained(tmp / "scheduler")
        total = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        if total > max_bytes:
            raise ValueError(f"export is {total / 1e6:.1f} MB, over {max_bytes / 1e6:.0f} MB")
        for f in tmp.rglob("*"):  # safetensors writes 0600; package data must be readable
            f.chmod(0o755 if f.is_dir() else 0o644)
        _replace_dir(tmp / "unet", dest / "unet")
        _replace_dir(tmp / "scheduler", dest / "scheduler")
        write_text_atomic(dest / "vidanon.json", json.dumps(info, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    """Command line for training runs (see module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m vidanon.prior.train", description=__doc__)
    ap.add_argument("--data", required=True, help="npz (shared format) or folder of images")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--resume", default=None, help="checkpoint/run folder, or 'auto' (= --out)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--checkpoint-every-s", type=float, default=None)
    ap.add_argument("--time-limit-s", type=float, default=None)
    ap.add_argument("--ckpt-mode", default="auto", choices=["auto", "full", "light"])
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--inpaint", action="store_true",
                    help="background-conditioned prior (vidanon.prior.inpaint)")
    ap.add_argument("--scaled", default=None,
                    help="cache of small video faces (python -m vidanon.prior.latents --scales)")
    ap.add_argument("--small-faces", type=float, default=0.0,
                    help="share of each batch drawn from --scaled")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from this unconditional checkpoint's EMA weights (widened)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    resume = None
    if a.resume == "auto":
        resume = a.out if (a.out / "ckpt" / "latest").exists() else None
    elif a.resume:
        resume = Path(a.resume)
    train_prior(
        a.data, a.out, resolution=a.resolution, preset=a.preset, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, seed=a.seed, resume=resume, device=a.device,
        ema_decay=a.ema_decay, checkpoint_every=a.checkpoint_every,
        time_limit_s=a.time_limit_s, compile=a.compile, quiet=a.quiet,
        checkpoint_every_s=a.checkpoint_every_s, warmup_steps=a.warmup_steps,
        ckpt_mode=a.ckpt_mode, log_every=a.log_every, inpaint=a.inpaint,
        init_from=a.init_from, scaled=a.scaled, small_faces=a.small_faces,
    )


if __name__ == "__main__":
    main()
