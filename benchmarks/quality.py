"""Face-set quality protocol: privacy, recoverability and attacks, for two face recognisers.

    python -m benchmarks.quality [--n 128] [--video-faces 4] [--config default] [--model M]

Two face sets, aligned as the model expects:

* ``utkface-heldout``: the face prior's held-out faces (never seen in training);
* ``video-tracks``: faces tracked by the pipeline itself in the shared clips (``per-track``
  frames of each of the longest tracks with eyes >= 16 px apart), so the numbers include
  video compression, pose and motion blur.

Identity models: MobileFaceNet (ONNX) and dlib's ResNet (when ``dlib`` is installed). For
each, the threshold is the cosine passed by 0.1 % of impostor pairs (all pairs of different
held-out faces), as in the reference paper; a condition's *above threshold* is the share of
faces whose similarity to their own original passes it (TAR@FAR=0.1 % for recovery; lower is
better for anonymized / wrong-key / attack rows). The clean ceiling is the TAR of genuine
pairs (two frames of one video track; held-out UTKFace has one photo per person, so none).
Engine settings come from the chosen preset, as in ``vidanon run``. Writes
benchmarks/results/quality.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import VIDEOS, machine, write_results
from benchmarks._identity import (
    FACES128,
    cached_thresholds,
    face_rate,
    identity_models,
    to_uint8_rgb,
)
from vidanon.align import crop_transform, frame_eye_px, oval_mask, to_tensor_batch, warp_crop
from vidanon.config import load_settings
from vidanon.diffusion.engine import Engine, _blur, background_fill, psnr
from vidanon.diffusion.keyed import mean_keeping_flip
from vidanon.diffusion.models import ModelSpec, load_model
from vidanon.keys import Key
from vidanon.media import probe, read_frames
from vidanon.passes import engine_settings
from vidanon.pipeline import detect_and_track
from vidanon.prior.data import load_dataset, split_indices

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality.json"
CLIPS = ["audience_multi_face_640x360.mp4", "walking_single_person_608x1080.mp4",
         "head_motion_a.mp4", "head_motion_b.mp4", "talking_head_512.mp4"]


def one_bit_off(k: Key) -> Key:
    raw = bytearray(k.reveal())
    raw[0] ^= 1
    return Key(bytes(raw))


def _inverted(eng: Engine, anon: torch.Tensor, masks: torch.Tensor):
    """What anyone can compute from the anonymized crop: its inverted (sign-flipped) noise."""
    model = eng.model
    sigma = eng.settings.fill_sigma * model.spec.crop_size
    bg = eng.background_trajectory(model.encode(background_fill(anon, masks, sigma)).float())
    m = eng.latent_mask(masks)
    return eng.invert(model.encode(anon).float(), m, bg), m, bg


def _decode(eng: Engine, z: torch.Tensor) -> torch.Tensor:
    return z if eng.model.vae is None else eng.model.decode(z).float()


def _unmap(eng: Engine, zt: torch.Tensor, m: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The engine's inverse keyed map with guessed signs in place of the key's: what an
    attacker who knows the method (and the public temperature and keep_mean) computes. The
    key's anchor noise is unknown to the attacker and left in."""
    y = zt / eng.mix[0]
    keep = eng.settings.keep_mean
    inside = mean_keeping_flip(y, signs, m, keep, inverse=True) if keep else signs * y
    return m * inside + (1 - m) * zt


@torch.no_grad()
def smoothness_attack(eng: Engine, anon: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """No key: invert the anonymized face, then guess each sign from its neighbourhood
    (assume the original noise was spatially smoother than the flipped one) and sample."""
    zt, m, bg = _inverted(eng, anon, masks)
    guess = torch.sign(_blur(zt, 1.0)) * torch.sign(zt)  # flip where a point disagrees locally
    return _decode(eng, eng.sample(_unmap(eng, zt, m, guess), m, bg))


@torch.no_grad()
def icm_attack(eng: Engine, anon: torch.Tensor, masks: torch.Tensor,
               iters: int = 10, sigma: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """No key: iterated conditional modes on the signs. Each sign is set to agree with the
    blurred field of its neighbours under the current guess, ten sweeps. A global sign flip
    is undetectable this way, so both candidates are returned (the caller keeps the better
    one per face: an upper bound on this attacker)."""
    zt, m, bg = _inverted(eng, anon, masks)
    centre = float(_blur(torch.nn.functional.pad(torch.ones(1, 1, 1, 1), (8, 8, 8, 8)),
                         sigma)[0, 0, 8, 8])
    s = torch.ones_like(zt)
    for _ in range(iters):
        v = s * zt * m
        neighbours = _blur(v, sigma) - centre * v
        s = torch.where(m > 0, torch.sign(zt * neighbours + 1e-12), torch.ones_like(zt))
    return tuple(_decode(eng, eng.sample(_unmap(eng, zt, m, s * g), m, bg)) for g in (1, -1))


def heldout_faces(spec: ModelSpec) -> torch.Tensor:
    faces, names = load_dataset(FACES128, spec.crop_size)
    _, held = split_indices(names)
    return torch.from_numpy(faces[held].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)


def heldout_set(spec: ModelSpec, n: int) -> tuple[torch.Tensor, torch.Tensor, list[Key]]:
    """The first ``n`` held-out faces, the model's oval as each one's mask, and one fixed
    random key per face: the set-up every held-out-face benchmark starts from."""
    x = heldout_faces(spec)[:n]
    masks = torch.from_numpy((oval_mask(spec) > 0.5).astype(np.float32))[None, None]
    rng = np.random.default_rng(0)
    return x, masks.repeat(len(x), 1, 1, 1), [Key(rng.bytes(16)) for _ in range(len(x))]


def video_faces(spec: ModelSpec, settings: dict, per_track: int, max_tracks: int = 3,
                min_eye_px: float = 16.0) -> tuple[torch.Tensor, list[str]]:
    """Aligned crops of the longest tracks in the shared clips, and a group label per crop."""
    crops, groups = [], []
    for name in CLIPS:
        clip = VIDEOS / name
        if not clip.exists():
            continue
        tracks = detect_and_track(clip, probe(clip), settings, quiet=True)
        want: dict[int, list] = {}
        for tr in sorted(tracks, key=lambda t: -len(t.detected))[:max_tracks]:
            big = sorted(f for f in tr.detected
                         if frame_eye_px(spec, crop_transform(tr.landmarks[f], spec))
                         >= min_eye_px)
            if len(big) < 2 * per_track:
                continue
            for f in big[:: len(big) // per_track][:per_track]:
                want.setdefault(f, []).append((tr, f))
        for frame in read_frames(clip):
            for tr, f in want.get(frame.index, []):
                m = crop_transform(tr.landmarks[f], spec)
                crops.append(warp_crop(frame.image, m, spec.crop_size))
                groups.append(f"{clip.stem}#{tr.id}")
    return to_tensor_batch(crops), groups


def references(ids: list, x: torch.Tensor) -> dict:
    """Per identity model: (its per-face context, the originals' embeddings)."""
    out = {}
    for idm in ids:
        ctx = idm.prepare(x)
        out[idm.name] = (ctx, idm.embed(x, ctx))
    return out


def evaluate(eng: Engine, x: torch.Tensor, ids: list, refs: dict, thresholds: dict,
             seed: int = 0) -> dict:
    """All conditions for one face set: similarity of each output to its own original
    (``refs`` as made by ``references`` for ``x``)."""
    masks = torch.from_numpy(oval_mask(eng.model.spec))[None, None].repeat(len(x), 1, 1, 1)
    rng = np.random.default_rng(seed)
    keys = [Key(rng.bytes(16)) for _ in range(len(x))]
    t0 = time.time()
    anon = eng.anonymize(x, masks, keys)
    t_anon = time.time() - t0
    quant = torch.round((anon + 1) * 127.5) / 127.5 - 1  # what a video frame can hold
    icm = icm_attack(eng, quant, masks)
    out = {
        "anonymized": anon,
        "recovered (right key)": eng.recover(quant, masks, keys),
        "recovered (random key)": eng.recover(quant, masks, [Key(rng.bytes(16)) for _ in keys]),
        "recovered (one bit off)": eng.recover(quant, masks, [one_bit_off(k) for k in keys]),
        "attack: local smoothness (no key)": smoothness_attack(eng, quant, masks),
        "attack: ICM signs, best of ± (no key)": icm,
        "round trip (no flip)": eng.roundtrip(x, masks),
    }
    rows = {}
    for name, y in out.items():
        row: dict = {}
        for idm in ids:
            ctx, e0 = refs[idm.name]
            if isinstance(y, tuple):  # the attack's two global-sign candidates: keep the better
                cos = np.maximum(*[np.sum(idm.embed(c, ctx) * e0, axis=1) for c in y])
            else:
                cos = np.sum(idm.embed(y, ctx) * e0, axis=1)
            row[idm.name] = {"mean_cos": round(float(cos.mean()), 4),
                             "above": round(float((cos >= thresholds[idm.name]).mean()), 4)}
        yy = y[0] if isinstance(y, tuple) else y
        # Does it still look like a face to a detector (YuNet, as for the prior's samples)?
        row["face_found"] = round(face_rate(to_uint8_rgb(yy)), 4)
        row["face_psnr_db"] = round(psnr(yy, x, mask=masks), 2)
        row["background_psnr_db"] = round(psnr(yy, x, mask=1 - masks), 2)
        rows[name] = row
    return {"faces": len(x), "anonymize_s_per_crop": round(t_anon / len(x), 3),
            "conditions": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128, help="held-out faces to transform")
    ap.add_argument("--video-faces", type=int, default=4, help="frames per video track (0=off)")
    ap.add_argument("--config", default=None, help="preset or YAML (engine settings)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    settings = load_settings(a.config, a.overrides)
    model = load_model(a.model or settings.get("model"), device="cpu")
    spec = model.spec
    es = engine_settings(model, settings)
    eng = Engine(model, es)

    ids = identity_models(spec)
    x_all = heldout_faces(spec)
    refs_all = references(ids, x_all)
    # Thresholds from sharp 128-px faces of different adults (see _identity.sharp_thresholds),
    # not from the model's own crops: small, blurry crops give far looser thresholds.
    thresholds, identity = {}, {}
    sharp = cached_thresholds()
    for idm in ids:
        thresholds[idm.name] = sharp[idm.name]["threshold"]
        identity[idm.name] = {"threshold_far_0.1pct": thresholds[idm.name],
                              "impostor_pairs": sharp[idm.name]["impostor_pairs"],
                              "source": sharp[idm.name]["source"]}

    sets = {}
    refs = {name: (None if ctx is None else ctx[: a.n], emb[: a.n])
            for name, (ctx, emb) in refs_all.items()}
    sets["utkface-heldout"] = evaluate(eng, x_all[: a.n], ids, refs, thresholds)
    if a.video_faces:
        xv, groups = video_faces(spec, settings, a.video_faces)
        refs = references(ids, xv)
        r = evaluate(eng, xv, ids, refs, thresholds)
        g = np.asarray(groups)
        iu = np.triu_indices(len(xv), 1)
        genuine = (g[:, None] == g[None, :])[iu]
        r["tracks"] = len(set(groups))
        r["genuine_pairs"] = int(genuine.sum())
        r["clean_tar"] = {idm.name: round(float(((refs[idm.name][1] @ refs[idm.name][1].T)
                                                  [iu][genuine] >= thresholds[idm.name]).mean()),
                                          4)
                          for idm in ids}
        sets["video-tracks"] = r

    result = {
        "machine": machine(),
        "model": spec.name,
        "weights_sha256": spec.weights_sha256,
        "config": a.config or "default",
        "steps": es.steps, "refine": es.refine, "strength": es.strength,
        "temperature": es.temperature, "anchor": es.anchor,
        "unet_calls_per_crop": eng.unet_calls_per_crop,
        "mean_unet_calls_per_crop": round(eng.mean_unet_calls_per_crop, 1),
        "identity_models": identity,
        "sets": sets,
    }
    write_results(a.out, result, markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    names = list(r["identity_models"])
    thr = ", ".join(f"{n} **{v['threshold_far_0.1pct']}** ({v['impostor_pairs']} pairs)"
                    for n, v in r["identity_models"].items())
    lines = [
        "## Quality (face-set protocol)",
        "",
        f"`python -m benchmarks.quality --config {r['config']}`: model `{r['model']}` (weights "
        f"`{r['weights_sha256'][:12]}`), {r['steps']} DDIM steps, refine {r['refine']}, "
        f"strength {r['strength']}, temperature {r.get('temperature', 1.0)}, "
        f"anchor {r.get('anchor', 0.0)}, "
        f"at most {r['unet_calls_per_crop']} UNet calls per crop "
        f"(mean {r.get('mean_unet_calls_per_crop', '?')} over all transforms); commit "
        f"`{r['machine']['commit']}`, {r['machine']['cpu']}. Thresholds at FAR 0.1 % over "
        f"impostor pairs of sharp 128-px faces of different adults: {thr}. *Above* = share "
        "of faces whose similarity "
        "to their own original passes the threshold: lower is better for anonymized, "
        "wrong-key and attack rows (privacy); higher is better for *recovered (right key)* "
        "(TAR@FAR=0.1 %). Recovery and attacks start from the anonymized crop rounded to 8 "
        "bits, as a video frame holds it. *Face found*: share of outputs in which YuNet "
        "finds a face (is the replacement a face at all?). PSNR over the face oval / the "
        "rest of the crop.",
    ]
    for set_name, s in r["sets"].items():
        lines += ["", f"### {set_name}: {s['faces']} faces"
                  + (f" from {s['tracks']} tracks" if "tracks" in s else ""), ""]
        if "clean_tar" in s:
            lines += ["Clean ceiling (two frames of one track, no anonymization; "
                      f"{s['genuine_pairs']} genuine pairs): "
                      + ", ".join(f"{n} TAR {100 * v:.1f} %" for n, v in s["clean_tar"].items())
                      + ".", ""]
        head = "| condition | " + " | ".join(f"{n} mean cos | {n} above" for n in names)
        lines += [head + " | face found | face PSNR dB | background PSNR dB |",
                  "|---" * (1 + 2 * len(names) + 3) + "|"]
        for cond, c in s["conditions"].items():
            cells = " | ".join(f"{c[n]['mean_cos']} | {100 * c[n]['above']:.1f} %" for n in names)
            found = f"{100 * c['face_found']:.1f} %" if "face_found" in c else "-"
            lines.append(f"| {cond} | {cells} | {found} | {c['face_psnr_db']} | "
                         f"{c['background_psnr_db']} |")
        lines += ["", f"CPU time to anonymize: {s['anonymize_s_per_crop']} s per crop."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
