"""Loading face diffusion models and the facts the pipeline needs about them.

A model folder follows the diffusers layout (``unet/``, optional ``vqvae/`` or ``vae/``,
``scheduler/``) plus an optional ``vidanon.json`` that says how training crops were framed
(the 5-point template and the face oval).  Alignment and masking must match the training
framing, otherwise the diffusion prior sees faces where it never saw them and both privacy
and recovery suffer; that is why the template travels with the weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel
from diffusers.utils import logging as diffusers_logging

from vidanon.errors import VidanonError
from vidanon.prior.autoencoder import DOWNSCALE as TAE_DOWNSCALE
from vidanon.prior.autoencoder import TinyAutoencoder, load_taef2
from vidanon.prior.inpaint import is_conditioned, unconditional

# diffusers' load-time advice (accelerate, dtype casts) is noise in a CLI's output.
diffusers_logging.set_verbosity_error()

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "prior" / "weights"
BUNDLED_NAME = "vidanon/face-prior-latent128"

# Landmarks (left eye, right eye, nose tip, left and right mouth corner) as fractions of
# the crop side, for crops aligned like FFHQ / CelebA-HQ (which ldm-celebahq-256 was
# trained on).  Measured averages of that alignment procedure, rounded.
CELEBAHQ_TEMPLATE = [
    [0.377, 0.469], [0.637, 0.469], [0.507, 0.590], [0.400, 0.722], [0.612, 0.722],
]
# Face oval (cx, cy, rx, ry) in crop fractions: covers brows to chin, cheek to cheek.
CELEBAHQ_OVAL = [0.507, 0.560, 0.215, 0.290]


@dataclass
class ModelSpec:
    """What the pipeline needs to know about a model, independent of its weights."""

    name: str
    kind: str  # "pixel" or "latent"
    crop_size: int
    latent_shape: tuple[int, int, int]
    template: list[list[float]]
    face_oval: list[float]
    scaling_factor: float = 1.0
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "crop_size": self.crop_size,
            "latent_shape": list(self.latent_shape),
            "template": self.template,
            "face_oval": self.face_oval,
            "weights_sha256": self.weights_sha256,
        }

    @property
    def eye_px(self) -> float:
        """Eye distance in a crop: divided by a face's crop scale, its size in the frame."""
        return float(np.linalg.norm(np.subtract(self.template[1], self.template[0]))
                     * self.crop_size)


class FaceModel(torch.nn.Module):
    """A UNet, an optional autoencoder and a DDIM noise schedule, used in eval mode only."""

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDIMScheduler,
        spec: ModelSpec,
        vae: VQModel | AutoencoderKL | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.scheduler = scheduler
        self.spec = spec

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to the space the UNet denoises (identity for pixel models)."""
        return self.encode_differentiable(x)

    def encode_differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """``encode`` with gradients (``vidanon.diffusion.framefit`` descends through it)."""
        if self.vae is None:
            return x
        if isinstance(self.vae, TinyAutoencoder):
            return self.vae.encode(x)
        x = x.to(self.vae.dtype)
        if isinstance(self.vae, VQModel):
            z = self.vae.encode(x).latents
        else:
            z = self.vae.encode(x).latent_dist.mean
        return z * self.spec.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z
        if isinstance(self.vae, TinyAutoencoder):
            return self.vae.decode(z)
        z = (z / self.spec.scaling_factor).to(self.vae.dtype)
        return self.vae.decode(z).sample

    @property
    def conditioned(self) -> bool:
        """Whether the UNet also takes the face's surroundings (``vidanon.prior.inpaint``)."""
        return is_conditioned(self.unet)

    @torch.no_grad()
    def eps(self, z: torch.Tensor, t: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise for a batch at one shared timestep.

        ``cond`` (``inpaint.condition``) is the background a conditioned model completes the
        face in; without it such a model samples freely. Unconditional models ignore it.
        """
        if self.conditioned:
            z = torch.cat([z, unconditional(z) if cond is None else cond.to(z.dtype)], 1)
        return self.unet(z.to(self.dtype), t).sample


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_state(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def _spec_for(name: str, unet: UNet2DModel, vae, meta: dict, weights_sha: str) -> ModelSpec:
    latent_size = int(unet.config.sample_size)
    latent_c = int(unet.config.out_channels)
    if vae is None:
        crop = latent_size
        kind = "pixel"
    elif isinstance(vae, TinyAutoencoder):
        crop = latent_size * TAE_DOWNSCALE
        kind = "latent"
    else:
        crop = latent_size * 2 ** (len(vae.config.block_out_channels) - 1)
        kind = "latent"
    return ModelSpec(
        name=name,
        kind=kind,
        crop_size=int(meta.get("crop_size", crop)),
        latent_shape=(latent_c, latent_size, latent_size),
        template=meta.get("template", CELEBAHQ_TEMPLATE),
        face_oval=meta.get("face_oval", CELEBAHQ_OVAL),
        scaling_factor=_scaling_factor(vae),
        weights_sha256=weights_sha,
        extra={k: v for k, v in meta.items()
               if k not in ("template", "face_oval", "crop_size", "latent_stats")},
    )


def _scaling_factor(vae) -> float:
    if vae is None or isinstance(vae, TinyAutoencoder):
        return 1.0  # TinyAutoencoder normalises its latents itself
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


def load_folder(path: Path, name: str | None = None) -> FaceModel:
    """Load a diffusers-layout folder (e.g. a local copy of CompVis/ldm-celebahq-256)."""
    path = Path(path)
    if not (path / "unet").is_dir():
        raise VidanonError(f"model folder {path} has no unet/ subfolder (diffusers layout)")
    unet = UNet2DModel.from_pretrained(path / "unet")
    meta_file = path / "vidanon.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    vae = None
    if meta.get("autoencoder") == "taef2":
        vae = load_taef2(path / "taef2", meta.get("latent_stats"))
    elif (path / "vqvae").is_dir():
        vae = VQModel.from_pretrained(path / "vqvae")
    elif (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(path / "vae")
    if (path / "scheduler").is_dir():
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    else:
        scheduler = DDIMScheduler(num_train_timesteps=1000)
    weights = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pth")]
    spec = _spec_for(name or meta.get("name", str(path)), unet, vae, meta, _hash_files(weights))
    return FaceModel(unet, scheduler, spec, vae)


def load_hub(repo_id: str) -> FaceModel:
    """Fetch a model from the Hugging Face hub (or its local cache) by id."""
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id, allow_patterns=["unet/*", "vqvae/*", "vae/*", "scheduler/*", "vidanon.json"]
        )
    except Exception as exc:  # network, auth, missing repo: one clear line
        raise VidanonError(
            f"cannot fetch model {repo_id!r} from the hub ({type(exc).__name__}); "
            "download it once elsewhere and pass the local folder with --model"
        ) from None
    return load_folder(Path(local), name=repo_id)


def _tiny_unet(size: int) -> UNet2DModel:
    unet = UNet2DModel(
        sample_size=size,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    _shrink_output(unet)
    return unet


def _ldm_scheduler() -> DDIMScheduler:
    """The noise schedule of CompVis/ldm-celebahq-256 (scaled-linear betas 0.0015..0.0195)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.0015, beta_end=0.0195, clip_sample=False)


def tiny_pixel(seed: int = 0, size: int = 32) -> FaceModel:
    """A small random pixel-space UNet: same code path as real models, for tests."""
    torch.manual_seed(seed)
    unet = _tiny_unet(size)
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    spec = _spec_for(f"tiny-pixel-{seed}", unet, None, _bundled_meta(), _hash_state(unet))
    return FaceModel(unet, sched, spec)


def tiny_latent(seed: int = 0, size: int = 32) -> FaceModel:
    """A small random UNet + VQModel pair shaped like ldm-celebahq-256, for tests."""
    torch.manual_seed(seed)
    vae = VQModel(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=3,
        num_vq_embeddings=64,
        norm_num_groups=8,
        layers_per_block=1,
    )
    unet = _tiny_unet(size // 2)
    sched = _ldm_scheduler()
    h = hashlib.sha256((_hash_state(unet) + _hash_state(vae)).encode()).hexdigest()
    spec = _spec_for(f"tiny-latent-{seed}", unet, vae, {}, h)
    return FaceModel(unet, sched, spec, vae)


def celebahq_shaped(seed: int = 0) -> FaceModel:
    """Random weights in the exact architecture of CompVis/ldm-celebahq-256 (benchmarks)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(224, 448, 672, 896),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=32,
    )
    vae = VQModel(
        block_out_channels=(128, 256, 512),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=3,
        num_vq_embeddings=8192,
        layers_per_block=2,
    )
    sched = _ldm_scheduler()
    spec = _spec_for("ldm-celebahq-256-shaped(random)", unet, vae, {}, "random")
    return FaceModel(unet, sched, spec, vae)


def _shrink_output(unet: UNet2DModel) -> None:
    # A random UNet predicts eps that has nothing to do with its input, and DDIM inversion
    # amplifies that by up to 1/sqrt(alpha_bar_T) (~150x); a near-zero output layer makes the
    # tiny test models near-linear, so tests exercise the mechanics (masking, flips,
    # fixed-point inversion) in a well-conditioned regime. Quality is measured on trained models.
    with torch.no_grad():
        unet.conv_out.weight.mul_(1e-3)
        unet.conv_out.bias.zero_()


def _bundled_meta() -> dict:
    """The bundled prior's framing (template, oval) only, so test models align like it."""
    f = BUNDLED_DIR / "vidanon.json"
    meta = json.loads(f.read_text()) if f.exists() else {}
    return {k: meta[k] for k in ("template", "face_oval") if k in meta}


def bundled_available() -> bool:
    return (BUNDLED_DIR / "unet").is_dir()


def load_model(name: str | None = None, device: str = "cpu", half: bool | None = None) -> FaceModel:
    """Resolve a model by name: bundled prior, test models, a local folder or a hub id."""
    if not name or name in ("default", "bundled", BUNDLED_NAME):
        if not bundled_available():
            raise VidanonError("the bundled face prior is not installed; pass --model")
        model = load_folder(BUNDLED_DIR, name=BUNDLED_NAME)
    elif name.startswith("tiny-pixel"):
        model = tiny_pixel()
    elif name.startswith("tiny-latent"):
        model = tiny_latent()
    elif name == "celebahq-shaped":
        model = celebahq_shaped()
    elif Path(name).expanduser().exists():
        model = load_folder(Path(name).expanduser())
    elif "/" in name and not name.startswith((".", "/")):
        model = load_hub(name)
    else:
        raise VidanonError(f"model {name!r} is neither a folder nor a hub id")
    dev = torch.device(device)
    use_half = dev.type == "cuda" if half is None else half
    # fp16 rather than bf16: DDIM inversion is only as exact as the UNet's arithmetic, and
    # fp16 keeps 3 more mantissa bits at the same speed; the DDIM state itself stays fp32.
    dtype = torch.float16 if use_half else torch.float32
    # channels_last lets oneDNN / cuDNN pick their fast convolution kernels: measured 17 -> 13 ms
    # per 64-px crop per UNet call on a 2-core CPU (outputs equal to 1e-5).
    model.unet.to(dev, dtype, memory_format=torch.channels_last)
    if isinstance(model.vae, TinyAutoencoder):
        model.vae.to(dev, dtype, memory_format=torch.channels_last)
    elif model.vae is not None:
        model.vae.to(dev, dtype)
    return model


def template_points(spec: ModelSpec) -> np.ndarray:
    """Template landmarks in crop pixels, shape (5, 2)."""
    return np.asarray(spec.template, dtype=np.float64) * spec.crop_size
