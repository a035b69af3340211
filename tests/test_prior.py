"""Offline face prior: held-out split, training loop determinism, checkpoints and export."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vidanon.diffusion.models import load_folder, load_model
from vidanon.prior.checkpoint import (
    checkpoint_bytes,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from vidanon.prior.data import (
    batch_indices,
    flip_mask,
    is_heldout,
    load_dataset,
    split_indices,
)
from vidanon.prior.train import (
    _state_tensors,
    build_unet,
    diffusion_loss,
    export_weights,
    face_oval_from_template,
    make_scheduler,
    train_prior,
)

SHARED = Path(__file__).parents[2] / "shared"
NPZ64 = SHARED / "data" / "faces" / "utkface_crop64.npz"
TEMPLATE = [[0.27, 0.25], [0.69, 0.26], [0.47, 0.47], [0.29, 0.65], [0.64, 0.66]]


def _synthetic_npz(path: Path, n: int = 64, size: int = 32) -> Path:
    """Easy 'faces': a bright ellipse with two dark eyes on a coloured background."""
    rng = np.random.default_rng(0)
    blobs, offsets, names = [], [0], []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        c = (size // 2 + int(rng.integers(-2, 3)), size // 2 + int(rng.integers(-2, 3)))
        cv2.ellipse(img, c, (size // 3, size // 2 - 3), 0, 0, 360, (200, 170, 150), -1)
        for dx in (-size // 7, size // 7):
            cv2.circle(img, (c[0] + dx, c[1] - size // 8), max(1, size // 16), (30, 30, 30), -1)
        ok, buf = cv2.imencode(".png", img)
        assert ok
        blobs.append(buf.ravel())
        offsets.append(offsets[-1] + buf.size)
        names.append(f"{20 + i % 50}_0_{i % 4}_2017{i:010d}")
    np.savez(
        path, jpeg=np.concatenate(blobs), offsets=np.array(offsets, np.int64),
        names=np.array(names),
    )
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return _synthetic_npz(tmp_path_factory.mktemp("faces") / "synth.npz")


def test_split_rule_is_order_independent_and_disjoint():
    names = [f"{a}_{g}_0_20170101{a:03d}{g}" for a in range(1, 400) for g in (0, 1)]
    tr, ho = split_indices(names)
    assert len(set(tr) & set(ho)) == 0 and len(tr) + len(ho) == len(names)
    held = {names[i] for i in ho}
    tr2, ho2 = split_indices(names[::-1])  # same faces in reverse order: same held-out names
    assert {names[::-1][i] for i in ho2} == held
    assert all(is_heldout(n) for n in held)


@pytest.mark.skipif(not NPZ64.exists(), reason="shared face data not present")
def test_real_split_holds_out_500_and_training_never_draws_them():
    with np.load(NPZ64) as z:
        names = [str(n) for n in z["names"]]
    tr, ho = split_indices(names)
    tr_again, ho_again = split_indices(names)
    assert np.array_equal(tr, tr_again) and np.array_equal(ho, ho_again)
    assert len(ho) >= 500 and len(tr) + len(ho) == len(names)
    assert not set(tr.tolist()) & set(ho.tolist())
    held = set(ho.tolist())
    per_epoch = len(tr) // 64
    drawn = np.concatenate([batch_indices(tr, 64, 0, s) for s in range(per_epoch + 5)])
    assert not held & set(drawn.tolist())
    # one epoch visits each training face at most once
    first = drawn[: per_epoch * 64]
    assert len(np.unique(first)) == len(first)


def test_data_order_depends_only_on_seed_and_step():
    tr = np.arange(100, 200)
    a = batch_indices(tr, 8, seed=3, step=17)
    assert np.array_equal(a, batch_indices(tr, 8, seed=3, step=17))
    assert not np.array_equal(a, batch_indices(tr, 8, seed=4, step=17))
    assert np.array_equal(flip_mask(8, 3, 17), flip_mask(8, 3, 17))
    assert set(a.tolist()) <= set(tr.tolist())


def test_load_folder_of_images(tmp_path, synth):
    faces, names = load_dataset(synth, 16)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{names[i]}.png"), faces[i][..., ::-1])
    got, got_names = load_dataset(tmp_path, 16)
    assert got.shape == (3, 16, 16, 3) and got.dtype == np.uint8
    assert got_names == sorted(names[:3])
    assert np.array_equal(got[got_names.index(names[0])], faces[0])


def test_loss_decreases_on_a_fixed_batch(synth):
    torch.manual_seed(0)
    faces, _ = load_dataset(synth, 16)
    x0 = torch.from_numpy(faces[:16]).permute(0, 3, 1, 2).float() / 127.5 - 1
    unet = build_unet("tiny", 16)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ac = make_scheduler().alphas_cumprod
    losses = []
    for _ in range(30):
        loss = diffusion_loss(unet, x0, noise, t, ac)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def _params(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(ckpt)
    return tensors


def test_resume_is_bit_identical_and_checkpoints_fit(tmp_path, synth):
    kw = dict(
        resolution=16, preset="tiny", batch_size=8, lr=1e-3, seed=5, device="cpu",
        quiet=True, warmup_steps=2, log_every=2,
    )
    full = train_prior(synth, tmp_path / "a", steps=6, checkpoint_every=100, **kw)
    part = train_prior(synth, tmp_path / "b", steps=3, checkpoint_every=100, **kw)
    _, meta = load_checkpoint(part)
    assert meta["step"] == 3 and meta["config"]["ckpt_mode"] == "full"
    resumed = train_prior(
        synth, tmp_path / "b", steps=6, checkpoint_every=100, resume=tmp_path / "b", **kw
    )
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training did change the weights
    first = _params(part)
    assert not torch.equal(first["model.conv_in.weight"], a["model.conv_in.weight"])
    total, largest = checkpoint_bytes(resumed)
    assert largest <= 16_000_000 and total <= 60_000_000
    assert resolve_checkpoint(tmp_path / "b").name == "step_00000006"
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in log)


def test_checkpoint_shards_and_atomic_latest(tmp_path):
    tensors = {f"w{i}": torch.full((1000,), float(i)) for i in range(10)}  # 4 kB each
    ck = save_checkpoint(tmp_path, 7, tensors, {"step": 7}, shard_bytes=10_000)
    files = sorted(ck.glob("tensors-*.safetensors"))
    assert len(files) == 5 and all(f.stat().st_size <= 10_000 for f in files)
    got, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 7 and all(torch.equal(got[k], v) for k, v in tensors.items())
    save_checkpoint(tmp_path, 8, tensors, {"step": 8})
    save_checkpoint(tmp_path, 9, tensors, {"step": 9})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000008", "step_00000009"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_cpu_preset_full_checkpoint_fits_the_size_limits(tmp_path):
    torch.manual_seed(0)
    model = build_unet("cpu", 64)
    ema = build_unet("cpu", 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, 3, 8, 8), 10).sample.mean().backward()
    opt.step()
    tensors = _state_tensors(model, ema, opt, "full")
    assert sum(k.startswith("opt.") for k in tensors) == 3 * len(list(model.parameters()))
    ck = save_checkpoint(tmp_path, 1, tensors, {"step": 1})
    total, largest = checkpoint_bytes(ck)
    assert largest <= 16_000_000 and total <= 60_000_000


def test_time_limit_stops_with_checkpoint(tmp_path, synth):
    ck = train_prior(
        synth, tmp_path, resolution=16, preset="tiny", steps=10_000, batch_size=8,
        device="cpu", quiet=True, time_limit_s=0.5, checkpoint_every=10_000,
    )
    _, meta = load_checkpoint(ck)
    assert 0 < meta["step"] < 10_000


def test_export_loads_with_the_pipeline_loader(tmp_path, synth):
    ck = train_prior(
        synth, tmp_path / "run", resolution=16, preset="tiny", steps=2, batch_size=8,
        device="cpu", quiet=True,
    )
    dest = export_weights(tmp_path / "run", tmp_path / "model", TEMPLATE)
    assert ck.parent.parent == tmp_path / "run"
    model = load_folder(dest)
    assert model.spec.crop_size == 16 and model.spec.kind == "pixel"
    assert model.spec.template == TEMPLATE
    assert model.spec.face_oval == face_oval_from_template(TEMPLATE)
    assert model.spec.name == "vidanon/face-prior-16"
    stored = load_file(str(dest / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}  # exported fp16
    meta = json.loads((dest / "vidanon.json").read_text())
    assert meta["training"]["steps"] == 2 and "non-commercial" in meta["licence"]
    sched = model.scheduler.config
    assert sched.beta_schedule == "linear" and sched.beta_end == 0.02 and not sched.clip_sample
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    assert size <= 48_000_000
    m32 = load_model(str(dest), device="cpu")
    assert m32.dtype == torch.float32
    eps = m32.eps(torch.randn(2, 3, 16, 16), 500)
    assert eps.shape == (2, 3, 16, 16) and torch.isfinite(eps).all()
    # EMA weights, not the raw model, are exported
    tensors, _ = load_checkpoint(ck)
    w = m32.unet.conv_in.weight
    assert torch.allclose(w, tensors["ema.conv_in.weight"].half().float())


def test_face_oval_formula():
    oval = face_oval_from_template(TEMPLATE)
    e = np.mean(TEMPLATE[:2], axis=0)
    m = np.mean(TEMPLATE[3:], axis=0)
    d = np.linalg.norm(m - e)
    assert oval == pytest.approx([(e[0] + m[0]) / 2, (e[1] + m[1]) / 2 + 0.15 * d,
                                  0.95 * d, 1.1 * d], abs=1e-4)


def test_sample_grid_runs_through_the_pipeline_loader(tmp_path, synth):
    from vidanon.prior.sample import sample_grid

    train_prior(
        synth, tmp_path / "run", resolution=16, preset="tiny", steps=1, batch_size=8,
        device="cpu", quiet=True,
    )
    dest = export_weights(tmp_path / "run", tmp_path / "model", TEMPLATE)
    grid = sample_grid(dest, n=4, steps=3, seed=1)
    assert grid.shape == (2 * 16 + 2, 2 * 16 + 2, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid, sample_grid(dest, n=4, steps=3, seed=1))  # seeded
    assert grid[:16, :16].std() > 0


NPZ128 = SHARED / "data" / "faces" / "utkface_crop128.npz"


@pytest.mark.skipif(not NPZ128.exists(), reason="shared face data not present")
def test_measure_template_on_real_faces():
    from vidanon.prior.template import detect_landmarks, template_from_landmarks

    with np.load(NPZ128) as z:
        blob, off = z["jpeg"], z["offsets"]
        tr, _ = split_indices([str(n) for n in z["names"]])
    faces = np.stack(
        [cv2.imdecode(blob[off[i] : off[i + 1]], cv2.IMREAD_COLOR)[..., ::-1] for i in tr[:12]]
    )
    lm = detect_landmarks(faces)
    assert (~np.isnan(lm).any(axis=(1, 2))).sum() >= 10
    template, oval = template_from_landmarks(lm)
    t = np.array(template)
    assert t.shape == (5, 2) and ((t > 0) & (t < 1)).all()
    assert t[0, 0] < t[2, 0] < t[1, 0] and t[3, 0] < t[4, 0]  # left/right order in the image
    assert t[:2, 1].max() < t[2, 1] < t[3:, 1].min()  # eyes above nose above mouth
    assert oval == face_oval_from_template(template)


def test_model_card_block_is_replaced(tmp_path):
    from vidanon.prior.export import CARD_BEGIN, CARD_END, update_card

    card = tmp_path / "MODEL_CARD.md"
    card.write_text(f"# card\n\n{CARD_BEGIN}\nold\n{CARD_END}\ntail\n")
    update_card(card, f"{CARD_BEGIN}\nnew\n{CARD_END}")
    text = card.read_text()
    assert "new" in text and "old" not in text and text.endswith("tail\n")
