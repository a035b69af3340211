"""Face-set quality protocol: privacy, recoverability and an attack, on held-out faces.

    python -m benchmarks.quality [--n 128] [--steps 20] [--refine 1] [--model FOLDER]

Uses the face prior's held-out faces (never seen in training), aligned as the model expects,
and MobileFaceNet identity embeddings. The threshold is set at FAR = 0.1 % on impostor pairs
(different held-out faces), as in the reference paper; then for each condition the share of
faces whose similarity to the original is above it. Writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vidanon.align import oval_mask
from vidanon.diffusion.engine import Engine, EngineSettings, _blur, background_fill, psnr
from vidanon.diffusion.models import load_model, template_points
from vidanon.identity import FaceEmbedder
from vidanon.keys import Key
from vidanon.prior.data import load_dataset, split_indices

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces" / "utkface_crop64.npz"
OUT = ROOT / "benchmarks" / "results" / "quality.json"


def embed_all(embedder: FaceEmbedder, crops: torch.Tensor, points: np.ndarray) -> np.ndarray:
    imgs = ((crops.clamp(-1, 1).numpy().transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)
    return np.stack([embedder(np.ascontiguousarray(im[..., ::-1]), points) for im in imgs])


def one_bit_off(k: Key) -> Key:
    raw = bytearray(k.reveal())
    raw[0] ^= 1
    return Key(bytes(raw))


@torch.no_grad()
def smoothness_attack(eng: Engine, anon: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """No key: invert the anonymized face, then guess each sign from its neighbourhood
    (assume the original noise was spatially smoother than the flipped one) and sample."""
    model = eng.model
    sigma = eng.settings.fill_sigma * model.spec.crop_size
    bg = eng.background_trajectory(model.encode(background_fill(anon, masks, sigma)).float())
    m = eng.latent_mask(masks)
    zt = eng.invert(model.encode(anon).float(), m, bg)
    guess = torch.sign(_blur(zt, 1.0)) * torch.sign(zt)  # flip where a point disagrees locally
    z = eng.sample(zt * (m * guess + (1 - m)), m, bg)
    return z if model.vae is None else model.decode(z).float()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--refine", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    model = load_model(a.model, device="cpu")
    spec = model.spec
    faces, names = load_dataset(FACES, spec.crop_size)
    _, held = split_indices(names)
    faces = faces[held]
    x_all = torch.from_numpy(faces.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    x = x_all[: a.n]
    masks = torch.from_numpy(oval_mask(spec))[None, None].repeat(len(x), 1, 1, 1)
    eng = Engine(model, EngineSettings(steps=a.steps, refine=a.refine, batch_size=32))
    rng = np.random.default_rng(0)
    keys = [Key(rng.bytes(16)) for _ in range(len(x))]

    t0 = time.time()
    anon = eng.anonymize(x, masks, keys)
    t_anon = time.time() - t0
    out = {
        "anonymized": anon,
        "recovered (right key)": eng.recover(anon, masks, keys),
        "recovered (random key)": eng.recover(anon, masks, [Key(rng.bytes(16)) for _ in keys]),
        "recovered (one bit off)": eng.recover(anon, masks, [one_bit_off(k) for k in keys]),
        "attack (smoothness signs, no key)": smoothness_attack(eng, anon, masks),
        "round trip (no flip)": eng.roundtrip(x, masks),
    }

    emb = FaceEmbedder()
    pts = template_points(spec)
    e_all = embed_all(emb, x_all, pts)
    sims = e_all @ e_all.T
    impostor = sims[np.triu_indices(len(e_all), 1)]
    thr = float(np.quantile(impostor, 0.999))
    e_orig = e_all[: len(x)]
    m = masks
    rows = {}
    for name, y in out.items():
        cos = np.sum(embed_all(emb, y, pts) * e_orig, axis=1)
        rows[name] = {
            "mean_cos": round(float(cos.mean()), 4),
            "share_above_threshold": round(float((cos >= thr).mean()), 4),
            "face_psnr_db": round(psnr(y, x, mask=m), 2),
            "background_psnr_db": round(psnr(y, x, mask=1 - m), 2),
        }
    result = {
        "model": spec.name,
        "weights_sha256": spec.weights_sha256,
        "faces": len(x),
        "impostor_pairs": int(len(impostor)),
        "threshold_far_0.1pct": round(thr, 4),
        "steps": a.steps,
        "refine": a.refine,
        "unet_calls_per_crop": eng.unet_calls_per_crop,
        "anonymize_s_per_crop_cpu": round(t_anon / len(x), 3),
        "identity_model": "MobileFaceNet (ONNX, 128-d)",
        "conditions": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    a.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result, indent=1))
    return result


def markdown(r: dict) -> str:
    lines = [
        "## Quality (face-set protocol)",
        "",
        f"`python -m benchmarks.quality --n {r['faces']} --steps {r['steps']} "
        f"--refine {r['refine']}`: {r['faces']} held-out faces of the face prior (never seen "
        f"in training), model `{r['model']}` (weights `{r['weights_sha256'][:12]}`), "
        f"{r['unet_calls_per_crop']} UNet calls per crop, {r['identity_model']}. Threshold = "
        f"cosine at FAR 0.1 % over {r['impostor_pairs']} impostor pairs (different held-out "
        f"faces): **{r['threshold_far_0.1pct']}**. *Above threshold* is the share of faces "
        "whose identity similarity to the original passes it: for *anonymized* and the "
        "wrong-key rows lower is better (privacy), for *recovered (right key)* higher is "
        "better (TAR@FAR=0.1 %). PSNR over the face oval and over the rest of the crop.",
        "",
        "| condition | mean cosine | above threshold | face PSNR dB | background PSNR dB |",
        "|---|---|---|---|---|",
    ]
    for name, c in r["conditions"].items():
        lines.append(f"| {name} | {c['mean_cos']} | {100 * c['share_above_threshold']:.1f} % "
                     f"| {c['face_psnr_db']} | {c['background_psnr_db']} |")
    lines += ["", f"CPU time to anonymize: {r['anonymize_s_per_crop_cpu']} s per crop.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
