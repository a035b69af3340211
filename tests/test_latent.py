"""The latent face prior: TAEF2 module, latent cache, latent training/export and loading."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vidanon.diffusion.engine import Engine, EngineSettings, psnr
from vidanon.diffusion.models import load_folder
from vidanon.prior.autoencoder import BUNDLED_TAEF2, load_taef2
from vidanon.prior.cycle import cycle_error
from vidanon.prior.latents import (
    at_frame_scale,
    channel_stats,
    encode_cache,
    encode_scaled_cache,
    load_latents,
    load_scaled,
)
from vidanon.prior.train import export_weights, make_scheduler, small_face_draw, train_prior

TEMPLATE = [[0.27, 0.25], [0.69, 0.25], [0.47, 0.47], [0.29, 0.66], [0.64, 0.67]]


def _faces_npz(path: Path, n: int = 24, size: int = 128) -> Path:
    """Smooth face-like images (an ellipse with eyes and a mouth) in the shared npz format."""
    rng = np.random.default_rng(1)
    blobs, offsets, names = [], [0], []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = rng.integers(40, 200, 3)
        c = (size // 2 + int(rng.integers(-6, 7)), size // 2 + int(rng.integers(-6, 7)))
        cv2.ellipse(img, c, (size // 3, size // 2 - 8), 0, 0, 360, (170, 150, 200), -1)
        for dx in (-size // 7, size // 7):
            cv2.circle(img, (c[0] + dx, c[1] - size // 8), size // 20, (40, 30, 30), -1)
        cv2.ellipse(img, (c[0], c[1] + size // 6), (size // 8, size // 30), 0, 0, 360,
                    (60, 60, 150), -1)
        img = cv2.GaussianBlur(img, (5, 5), 1.5)
        ok, buf = cv2.imencode(".png", img)
        assert ok
        blobs.append(buf.ravel())
        offsets.append(offsets[-1] + buf.size)
        names.append(f"{20 + i}_0_{i % 4}_2017{i:010d}")
    np.savez(path, jpeg=np.concatenate(blobs), offsets=np.array(offsets, np.int64),
             names=np.array(names))
    return path


def test_small_face_cache_holds_only_the_frames_detail_and_training_draws_from_it(tmp_path):
    npz = _faces_npz(tmp_path / "f.npz", n=16)
    with np.load(npz) as z:
        img = cv2.imdecode(z["jpeg"][z["offsets"][0]:z["offsets"][1]], 1)[None]
    img = img.copy()
    img[0, ::2] = 255  # fine stripes: detail a face 0.3 of the crop's size cannot hold
    small = at_frame_scale(img, 0.3)
    assert small.shape == img.shape
    stripes = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert stripes(small) < 0.2 * stripes(img)
    assert np.abs(at_frame_scale(img, 1.0).astype(int) - img).max() <= 1
    cache = encode_cache(npz, tmp_path / "lat.npz", quiet=True)
    scaled = encode_scaled_cache(npz, tmp_path / "small.npz", [0.3, 0.5], quiet=True)
    by_scale, names = load_scaled(scaled)
    lat, _, names0 = load_latents(cache)
    assert list(by_scale) == [0.3, 0.5] and names == names0
    assert by_scale[0.3].shape == lat.shape and not np.allclose(by_scale[0.3], lat, atol=1e-2)
    # The draw is a function of (seed, step): a resumed run continues it.
    a, b = small_face_draw(64, 0, 7, 0.5, 2), small_face_draw(64, 0, 7, 0.5, 2)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and 10 < a[0].sum() < 54
    assert set(a[1]) == {0, 1} and not small_face_draw(64, 0, 7, 0.0, 2)[0].any()
    run = tmp_path / "run"
    train_prior(cache, run, resolution=16, preset="tiny", steps=2, batch_size=8, quiet=True,
                device="cpu")
    # The share can be turned on when resuming (an augmentation); the config says so.
    train_prior(cache, run, resolution=16, preset="tiny", steps=4, batch_size=8, quiet=True,
                device="cpu", resume=run, scaled=scaled, small_faces=0.5)
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["small_faces"] == 0.5 and cfg["scaled"] == "small.npz"
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["small_faces"] == 0.5
    with pytest.raises(ValueError, match="small faces"):
        train_prior(cache, run, resolution=16, preset="tiny", steps=5, batch_size=8,
                    quiet=True, device="cpu", resume=run, small_faces=0.5)


def test_taef2_ships_with_its_licence_and_reconstructs(tmp_path):
    assert (BUNDLED_TAEF2 / "LICENSE").read_text().strip().startswith("MIT")
    ae = load_taef2()
    npz = _faces_npz(tmp_path / "f.npz", n=4)
    with np.load(npz) as z:
        img = cv2.imdecode(z["jpeg"][z["offsets"][0]:z["offsets"][1]], cv2.IMREAD_COLOR)
    x = torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z = ae.encode_raw(x)
        y = ae.decode_raw(z)
    assert z.shape == (1, 32, 16, 16)
    # Wrong layer order or wrong input range gives garbage (< 15 dB); TAEF2 gets ~30 dB.
    assert psnr(y.clamp(-1, 1), x) > 25


def test_latent_cache_has_mirrors_and_training_uses_it(tmp_path):
    npz = _faces_npz(tmp_path / "f.npz")
    cache = encode_cache(npz, tmp_path / "lat.npz", quiet=True)
    lat, lat_flip, names = load_latents(cache)
    assert lat.shape == (24, 32, 16, 16) and lat_flip.shape == lat.shape and len(names) == 24
    # The mirror is encoded, not a mirrored latent.
    assert not np.allclose(lat_flip, lat[..., ::-1], atol=1e-2)
    shift, scale = channel_stats(lat)
    assert len(shift) == 32 and min(scale) > 0

    run = tmp_path / "run"
    train_prior(cache, run, resolution=16, preset="tiny", steps=4, batch_size=8, quiet=True,
                device="cpu", checkpoint_every=2)
    # Resuming a latent run continues from its checkpoint.
    train_prior(cache, run, resolution=16, preset="tiny", steps=6, batch_size=8, quiet=True,
                device="cpu", resume=run)
    out = export_weights(run, tmp_path / "model", TEMPLATE)
    meta = json.loads((out / "vidanon.json").read_text())
    assert meta["kind"] == "latent" and meta["crop_size"] == 128
    assert meta["autoencoder"] == "taef2" and meta["training"]["steps"] == 6
    assert len(meta["latent_stats"]["scale"]) == 32
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear"  # a latent-diffusion schedule

    model = load_folder(out)
    assert model.spec.kind == "latent" and model.spec.crop_size == 128
    assert tuple(model.spec.latent_shape) == (32, 16, 16)
    # Normalised latents: the stats are applied, so the training faces encode to ~unit std.
    with np.load(npz) as z:
        imgs = [cv2.imdecode(z["jpeg"][z["offsets"][i]:z["offsets"][i + 1]], 1)[..., ::-1]
                for i in range(8)]
    x = torch.from_numpy(np.stack(imgs).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    zz = model.encode(x)
    assert 0.5 < float(zz.std()) < 2.0
    # The engine runs on the latent model end to end: round trip keeps the crop.
    masks = torch.zeros(8, 1, 128, 128)
    masks[:, :, 32:100, 32:96] = 1
    eng = Engine(model, EngineSettings(steps=3, refine=4, batch_size=8))
    rt = eng.roundtrip(x, masks)
    assert rt.shape == x.shape and psnr(rt, x) > 20


def test_latent_schedule_keeps_signal_at_the_noisiest_level():
    lat = make_scheduler(latent=True).alphas_cumprod[-1]
    pix = make_scheduler().alphas_cumprod[-1]
    assert 0.003 < float(lat) < 0.01 and float(pix) < 1e-4


def test_cycle_error_of_stock_taef2_is_large(tmp_path):
    """The problem the fine-tuned decoder fixes: stock TAEF2 does not round-trip latents."""
    npz = _faces_npz(tmp_path / "f.npz", n=4)
    with np.load(npz) as z:
        imgs = [cv2.imdecode(z["jpeg"][z["offsets"][i]:z["offsets"][i + 1]], 1)[..., ::-1]
                for i in range(4)]
    x = torch.from_numpy(np.stack(imgs).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    ae = load_taef2()
    with torch.no_grad():
        err = cycle_error(ae, ae.encode_raw(x))
    assert err.shape == (4,) and float(err.mean()) > 0.05


def test_cycle_finetune_trains_on_latents_the_engine_wrote(tmp_path):
    """``make_pool`` keeps what anonymization really decodes (the flipped face inside the
    mask), and ``train_cycle`` alternates those with its synthetic stand-ins."""
    from vidanon.prior.cycle import make_pool, train_cycle

    npz = _faces_npz(tmp_path / "f.npz", n=24)
    cache = encode_cache(npz, tmp_path / "lat.npz", quiet=True)
    pool = make_pool(npz, tmp_path / "pool.npz", n=4, temperatures=(0.8,), steps=2)
    with np.load(pool) as p:
        z, idx, tau, m, alpha = (p[k] for k in ("z", "face_index", "tau", "mask_lat", "alpha"))
    lat, _, _ = load_latents(cache)
    assert z.shape == (4, 32, 16, 16) and np.isfinite(z).all() and (tau == np.float32(0.8)).all()
    assert m.shape == (4, 16, 16) and m.dtype == bool and 40 < m[0].sum() < 256
    assert alpha.shape == (4, 128, 128) and alpha.max() == 1 and alpha.min() == 0
    # Inside the face mask the written latent is another face's, not the original's.
    inside = np.broadcast_to(m[:, None], z.shape)
    rel = np.linalg.norm((z - lat[idx])[inside]) / np.linalg.norm(lat[idx][inside])
    assert rel > 0.3
    state = train_cycle(str(npz), str(cache), tmp_path / "cyc", steps=10, batch=2, pool=pool)
    assert torch.load(state, weights_only=True)["step"] == 10
    log = [json.loads(line)
           for line in (tmp_path / "cyc" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["cycle_pool"] > 0 and log[0]["cycle"] > 0
