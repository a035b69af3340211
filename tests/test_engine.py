"""The keyed DDIM engine on small random models of the real classes (CPU)."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel, VQModel

from vidanon.align import oval_mask
from vidanon.diffusion.engine import Engine, EngineSettings, background_fill, psnr
from vidanon.diffusion.models import load_folder, load_model, tiny_latent, tiny_pixel
from vidanon.keys import Key

N = 4


@pytest.fixture(scope="module")
def pixel():
    return tiny_pixel()


def _faces(size: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic").clamp(-1, 1)


def _masks(model, n: int = N) -> torch.Tensor:
    m = torch.from_numpy(oval_mask(model.spec))
    return m[None, None].repeat(n, 1, 1, 1)


def _keys(n: int = N, seed: int = 0) -> list[Key]:
    rng = np.random.default_rng(seed)
    return [Key(rng.bytes(16)) for _ in range(n)]


def test_background_fill_ignores_masked_pixels():
    x = _faces(32)
    m = (torch.rand(N, 1, 32, 32) > 0.7).float()
    y = x.clone()
    y[m.expand_as(y) > 0] = 5.0  # change only masked pixels
    assert torch.allclose(background_fill(x, m, 4.0), background_fill(y, m, 4.0), atol=1e-6)


def test_anonymize_recover_wrong_key(pixel):
    eng = Engine(pixel, EngineSettings(steps=6, refine=2, batch_size=8))
    x, m, keys = _faces(32), _masks(pixel), _keys()
    anon = eng.anonymize(x, m, keys)
    outside = 1 - m
    # Outside the mask the pixel model returns the original exactly (float tolerance).
    assert (anon - x).abs().mul(outside).max() < 1e-4
    p_anon = psnr(anon, x, mask=m)
    rec = eng.recover(anon, m, keys)
    p_rec = psnr(rec, x, mask=m)
    assert p_anon < 20
    assert p_rec > p_anon + 25, (p_anon, p_rec)
    wrong = eng.recover(anon, m, _keys(seed=9))
    assert psnr(wrong, x, mask=m) < p_anon + 5
    raw = bytearray(keys[0].reveal())
    raw[0] ^= 1
    one_bit = eng.recover(anon[:1], m[:1], [Key(bytes(raw))])
    assert psnr(one_bit, x[:1], mask=m[:1]) < p_anon + 5


def test_roundtrip_error_shrinks_with_refinement(pixel):
    x, m = _faces(32), _masks(pixel)
    errs = {}
    for refine in (0, 2):
        eng = Engine(pixel, EngineSettings(steps=6, refine=refine))
        errs[refine] = psnr(eng.roundtrip(x, m), x, mask=m)
    assert errs[2] > 60, errs  # stated: >60 dB latent round trip with 2 refinements
    assert errs[2] > errs[0] + 10, errs


def test_deterministic_and_batch_invariant(pixel):
    x, m, keys = _faces(32), _masks(pixel), _keys()
    a = Engine(pixel, EngineSettings(steps=4, refine=1, batch_size=4)).anonymize(x, m, keys)
    b = Engine(pixel, EngineSettings(steps=4, refine=1, batch_size=4)).anonymize(x, m, keys)
    c = Engine(pixel, EngineSettings(steps=4, refine=1, batch_size=1)).anonymize(x, m, keys)
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-4)


def test_latent_model_roundtrip_in_latent_space():
    model = tiny_latent()
    assert model.spec.kind == "latent" and model.spec.latent_shape == (3, 16, 16)
    eng = Engine(model, EngineSettings(steps=5, refine=2))
    x = _faces(32, 2)
    m = eng.latent_mask(_masks(model, 2))
    z0 = model.encode(x).float()
    bg = eng.background_trajectory(model.encode(background_fill(x, _masks(model, 2), 4.0)))
    zT = eng.invert(z0, m, bg)
    s = eng.flips(_keys(2)) * m + (1 - m)
    z_anon = eng.sample(zT * s, m, bg)
    z_rec = eng.sample(eng.invert(z_anon, m, bg) * s, m, bg)
    err_anon = float(((z_anon - z0) * m).abs().max())
    err_rec = float(((z_rec - z0) * m).abs().max())
    assert err_rec < 1e-3 < err_anon
    out = eng.anonymize(x, _masks(model, 2), _keys(2))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_diffusers_folder_layout_loads(tmp_path):
    src = tiny_latent(seed=3)
    src.unet.save_pretrained(tmp_path / "unet")
    src.vae.save_pretrained(tmp_path / "vqvae")
    src.scheduler.save_pretrained(tmp_path / "scheduler")
    m = load_folder(tmp_path)
    assert isinstance(m.unet, UNet2DModel) and isinstance(m.vae, VQModel)
    assert m.spec.crop_size == 32 and m.spec.kind == "latent"
    assert len(m.spec.weights_sha256) == 64
    assert load_folder(tmp_path).spec.weights_sha256 == m.spec.weights_sha256
    m2 = load_model(str(tmp_path))
    x = _faces(32, 1)
    assert torch.allclose(m2.decode(m2.encode(x)), src.decode(src.encode(x)), atol=1e-5)


def test_anderson_solves_fixed_points_plain_iteration_cannot():
    # g(u) = A u + b with spectral radius 1.5 per sample: u <- g(u) diverges, Anderson mixing
    # of three iterates solves the linear problem (up to round-off) in a few calls.
    from vidanon.diffusion.engine import anderson

    torch.manual_seed(0)
    a = torch.tensor([-1.5, -0.9, 0.5, 0.0]).view(4, 1, 1, 1)  # one rate per sample
    b = torch.randn(4, 2, 4, 4)

    calls = []

    def g(u, idx):
        calls.append(len(u))
        rows = slice(None) if idx is None else idx
        return a[rows] * u + b[rows]

    u = anderson(g, torch.zeros_like(b), iters=4)
    exact = b / (1 - a)
    assert torch.allclose(u, exact, atol=1e-5)
    plain = torch.zeros_like(b)
    for _ in range(4):
        plain = g(plain, None)
    assert (plain - exact)[0].abs().max() > 1.0  # the diverging sample
    # per-sample coefficients: solving a sample alone gives the same answer as in the batch
    alone = anderson(lambda v, i: a[:1] * v + b[:1], torch.zeros_like(b[:1]), iters=4)
    assert torch.allclose(alone, u[:1], atol=1e-6)
    # with a tolerance, converged samples stop costing evaluations and the loop ends early
    calls.clear()
    u = anderson(g, torch.zeros_like(b), iters=20, tol=1e-6)
    assert torch.allclose(u, exact, atol=1e-5)
    assert len(calls) < 20 and calls[-1] < calls[0] == 4  # g constant for the last sample


def test_strength_starts_the_schedule_lower_and_still_inverts(pixel):
    from vidanon.diffusion.ddim import DDIM

    full = DDIM(pixel.scheduler, 4)
    half = DDIM(pixel.scheduler, 4, strength=0.5)
    assert full.timesteps[0] > 700 and 300 <= half.timesteps[0] <= 550
    assert half.timesteps[-1] == full.timesteps[-1]
    with pytest.raises(ValueError):
        DDIM(pixel.scheduler, 4, strength=0.0)
    x, m = _faces(32), _masks(pixel)
    eng = Engine(pixel, EngineSettings(steps=4, refine=3, strength=0.5))
    keys = _keys()
    anon = eng.anonymize(x, m, keys)
    assert psnr(eng.recover(anon, m, keys), x, mask=m) > psnr(anon, x, mask=m) + 20


def test_temperature_is_divided_out_on_recovery_and_only_there(pixel):
    # anonymize scales the flipped face noise by tau, recover by 1/tau: still an exact inverse,
    # but no longer an involution, and a different output from tau = 1 for the same key.
    x, m, keys = _faces(32), _masks(pixel), _keys()
    cold = Engine(pixel, EngineSettings(steps=6, refine=3, temperature=0.5))
    anon = cold.anonymize(x, m, keys)
    rec = cold.recover(anon, m, keys)
    assert psnr(rec, x, mask=m) > psnr(anon, x, mask=m) + 20
    twice = cold.anonymize(anon, m, keys)
    assert psnr(twice, x, mask=m) < psnr(rec, x, mask=m) - 10
    unit = Engine(pixel, EngineSettings(steps=6, refine=3)).anonymize(x, m, keys)
    assert psnr(unit, anon, mask=m) < 40
    assert (anon - x).abs().mul(1 - m).max() < 1e-4  # the background is untouched


def test_anchor_is_shared_by_a_tracks_frames_and_taken_away_on_recovery(pixel):
    # Two unrelated noises mapped with one key: their images correlate by w (the anchor's
    # share of the variance), the pseudo-identity that every frame of a track shares.
    eng = Engine(pixel, EngineSettings(steps=4, refine=3, temperature=0.8, anchor=0.5))
    g = torch.Generator().manual_seed(3)
    shape = (2, *pixel.spec.latent_shape)
    z, m = torch.randn(shape, generator=g), torch.ones(shape)
    key = _keys(1) * 2
    a, b = eng.mix
    assert abs(a**2 + b**2 - 0.64) < 1e-6 and abs(b**2 / 0.64 - 0.5) < 1e-6
    y = eng.keyed_noise(z, m, key, forward=True)
    corr = float(torch.corrcoef(y.flatten(1))[0, 1])
    assert 0.4 < corr < 0.6, corr
    plain = Engine(pixel, EngineSettings(temperature=0.8)).keyed_noise(z, m, key, forward=True)
    assert abs(float(torch.corrcoef(plain.flatten(1))[0, 1])) < 0.1
    assert torch.allclose(eng.keyed_noise(y, m, key, forward=False), z, atol=1e-5)
    half = m.clone()
    half[..., :5] = 0
    assert torch.equal(eng.keyed_noise(z, half, key, forward=True)[..., :5], z[..., :5])
    # End to end. The random tiny model inverts to noise of RMS ~0.05, not ~1 as a trained
    # prior does, so only a small anchor leaves its clamped output unsaturated.
    x, mm, keys = _faces(32), _masks(pixel), _keys()
    eng = Engine(pixel, EngineSettings(steps=4, refine=3, temperature=0.8, anchor=0.002))
    anon = eng.anonymize(x, mm, keys)
    rec = psnr(eng.recover(anon, mm, keys), x, mask=mm)
    no_anchor = Engine(pixel, EngineSettings(steps=4, refine=3, temperature=0.8))
    assert rec > psnr(anon, x, mask=mm) + 8
    assert rec > psnr(no_anchor.recover(anon, mm, keys), x, mask=mm) + 5  # anchor taken away
    assert rec > psnr(eng.recover(anon, mm, _keys(seed=5)), x, mask=mm) + 5


def test_inversion_memo_serves_a_new_key_without_inverting_again(pixel):
    # The privacy guard tries a new key on frames it already inverted for the larger mask.
    from vidanon.diffusion.engine import Inversions

    x, m = _faces(32), _masks(pixel)
    memo = Inversions()
    s = EngineSettings(steps=4, refine=1, batch_size=4)
    first = Engine(pixel, s, memo)
    first.anonymize(x[:2], m[:2], _keys(2, seed=1))
    again = Engine(pixel, s, memo)
    got = again.anonymize(x, m, _keys(seed=2))
    fresh = Engine(pixel, s)
    want = fresh.anonymize(x, m, _keys(seed=2))
    assert memo.hits == 2
    assert torch.allclose(got, want, atol=1e-4)
    assert again.evals < fresh.evals  # two crops only sampled
    other = m.clone()
    other[:, :, :4] = 0  # another mask is another inversion
    Engine(pixel, s, memo).anonymize(x[:1], other[:1], _keys(1))
    assert memo.hits == 2
    tiny = Inversions(max_bytes=1)  # too small to keep anything: still correct
    assert torch.allclose(Engine(pixel, s, tiny).anonymize(x, m, _keys(seed=2)), want,
                          atol=1e-4)


def test_mean_keeping_flip_keeps_the_masks_mean_scrambles_the_rest_and_inverts():
    from vidanon.diffusion.keyed import mask_unit, mean_keeping_flip

    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 4, 8, 8, generator=g) + 0.7  # a non-zero mean per channel
    s = torch.where(torch.rand(3, 4, 8, 8, generator=g) < 0.5, -1.0, 1.0)
    m = torch.zeros(3, 1, 8, 8)
    m[..., 2:7, 1:6] = 1
    u = mask_unit(m, z)
    mean = (z * u).sum((2, 3))
    for keep in (1.0, 0.5):
        y = mean_keeping_flip(z, s, m, keep)
        assert torch.allclose((y * u).sum((2, 3)), keep * mean, atol=1e-5)
        assert torch.equal(y * (1 - m), z * (1 - m))  # outside the mask: untouched
        rest_z = z * m - mean[..., None, None] * u
        rest_y = y * m - (y * u).sum((2, 3), keepdim=True) * u
        # Orthogonal on the rest: same norm, but scrambled (far from the original).
        assert torch.allclose(rest_z.norm(), rest_y.norm(), rtol=1e-4)
        assert float((rest_y - rest_z).norm()) > float(rest_z.norm())
        assert torch.allclose(mean_keeping_flip(y, s, m, keep, inverse=True), z, atol=1e-5)
    # The plain flip does not keep the mean.
    flipped = s * z * m + z * (1 - m)
    assert float(((flipped * u).sum((2, 3)) - mean).abs().mean()) > 0.5


def test_engine_with_mean_keeping_recovers_and_differs_from_the_flip(pixel):
    x, m, keys = _faces(32), _masks(pixel), _keys()
    eng = Engine(pixel, EngineSettings(steps=6, refine=3, keep_mean=0.5))
    anon = eng.anonymize(x, m, keys)
    assert psnr(eng.recover(anon, m, keys), x, mask=m) > psnr(anon, x, mask=m) + 20
    flip = Engine(pixel, EngineSettings(steps=6, refine=3)).anonymize(x, m, keys)
    assert psnr(flip, anon, mask=m) < 40
    wrong = eng.recover(anon, m, _keys(seed=9))
    assert psnr(wrong, x, mask=m) < psnr(anon, x, mask=m) + 5
