"""The background-conditioned prior: widening, masks, the condition, training and the engine."""

import json

import numpy as np
import pytest
import torch
from test_prior import _synthetic_npz

from vidanon.align import oval_mask
from vidanon.diffusion.engine import Engine, EngineSettings, psnr
from vidanon.diffusion.models import FaceModel, tiny_pixel
from vidanon.keys import Key
from vidanon.prior.inpaint import (
    UNCOND_SHARE,
    cond_channels,
    condition,
    is_conditioned,
    train_masks,
    unconditional,
    widen,
)
from vidanon.prior.train import export_weights, train_prior

OVAL = [0.4733, 0.5166, 0.3904, 0.452]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return _synthetic_npz(tmp_path_factory.mktemp("faces") / "synth.npz")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cond_pixel() -> FaceModel:
    """The tiny pixel test model, widened, with the new input weights made non-zero so that
    the background really changes the noise prediction."""
    base = tiny_pixel()
    unet = widen(base.unet)
    with torch.no_grad():
        torch.manual_seed(3)
        unet.conv_in.weight[:, 3:].normal_(0, 0.2)
    return FaceModel(unet, base.scheduler, base.spec)


def test_widened_unet_starts_as_the_prior_it_came_from():
    base = tiny_pixel().unet
    wide = widen(base)
    assert is_conditioned(wide) and not is_conditioned(base)
    assert wide.config.in_channels == cond_channels(3) == 7
    z = torch.randn(2, 3, 32, 32)
    bg = torch.randn(2, 3, 32, 32)
    m = torch.zeros(2, 1, 32, 32)
    m[:, :, 8:24, 8:24] = 1
    with torch.no_grad():
        a = base(z, 500).sample
        b = wide(torch.cat([z, condition(bg, m)], 1), 500).sample
    assert torch.allclose(a, b, atol=1e-6)


def test_condition_hides_the_face_and_a_border_around_it():
    bg = torch.ones(1, 2, 8, 8)
    m = torch.zeros(1, 1, 8, 8)
    m[:, :, 3:5, 3:5] = 1
    c = condition(bg, m)
    assert c.shape == (1, 3, 8, 8)
    grown = c[:, 2]
    assert grown[0, 2:6, 2:6].min() == 1 and grown.sum() == 16  # one cell of growth
    assert c[:, :2][grown.unsqueeze(1).expand(1, 2, 8, 8) > 0].abs().max() == 0
    assert c[0, 0, 0, 0] == 1  # the background far from the face is shown
    u = unconditional(bg)
    assert u[:, :2].abs().max() == 0 and u[:, 2].min() == 1


def test_train_masks_are_face_ovals_with_an_unconditional_share():
    g = torch.Generator().manual_seed(0)
    m = train_masks(2000, 16, OVAL, g)
    assert m.shape == (2000, 1, 16, 16) and set(torch.unique(m).tolist()) <= {0.0, 1.0}
    full = (m.flatten(1).min(1).values == 1).float().mean()
    assert abs(float(full) - UNCOND_SHARE) < 0.03
    area = m.flatten(1).mean(1)[m.flatten(1).min(1).values < 1]
    # The template's oval covers ~55 % of the crop; scaled 0.75-1.2 per axis and clipped.
    assert float(area.min()) > 0.25 and float(area.max()) < 0.9
    assert float(area.std()) > 0.05  # the sizes vary
    again = train_masks(2000, 16, OVAL, torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


def test_conditioned_engine_recovers_and_the_condition_is_the_background(cond_pixel):
    eng = Engine(cond_pixel, EngineSettings(steps=6, refine=3, batch_size=8))
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 6, 6, generator=g) * 2 - 1,
                                        size=(32, 32), mode="bicubic").clamp(-1, 1)
    m = torch.from_numpy(oval_mask(cond_pixel.spec))[None, None].repeat(4, 1, 1, 1)
    rng = np.random.default_rng(0)
    keys = [Key(rng.bytes(16)) for _ in range(4)]
    anon = eng.anonymize(x, m, keys)
    assert (anon - x).abs().mul(1 - m).max() < 1e-4
    rec = eng.recover(anon, m, keys)
    assert psnr(rec, x, mask=m) > psnr(anon, x, mask=m) + 25
    # The same crop with another background gives another face: the UNet sees it.
    x2 = x.clone()
    x2[..., :6] = -x2[..., :6]
    anon2 = eng.anonymize(x2, m, keys)
    assert (anon2 - anon).abs().mul(m).max() > 1e-3
    # Unconditional use of the same model (free samples) still runs.
    eps = cond_pixel.eps(torch.randn(2, 3, 32, 32), 500)
    assert eps.shape == (2, 3, 32, 32)


def test_inpaint_training_from_an_unconditional_checkpoint(tmp_path, synth):
    base = tmp_path / "base"
    train_prior(synth, base, resolution=16, preset="tiny", steps=3, batch_size=8, quiet=True,
                device="cpu")
    run = tmp_path / "inpaint"
    run.mkdir()
    (run / "template.json").write_text(json.dumps({"face_oval": OVAL}))
    train_prior(synth, run, resolution=16, preset="tiny", steps=4, batch_size=8, quiet=True,
                device="cpu", inpaint=True, init_from=base, checkpoint_every=2)
    train_prior(synth, run, resolution=16, preset="tiny", steps=5, batch_size=8, quiet=True,
                device="cpu", inpaint=True, resume=run)
    with pytest.raises(ValueError, match="inpaint"):
        train_prior(synth, run, resolution=16, preset="tiny", steps=6, batch_size=8,
                    quiet=True, device="cpu", resume=run)
    out = export_weights(run, tmp_path / "model", [[0.3, 0.3], [0.7, 0.3], [0.5, 0.5],
                                                   [0.35, 0.7], [0.65, 0.7]])
    from vidanon.diffusion.models import load_folder

    model = load_folder(out)
    assert model.conditioned and tuple(model.spec.latent_shape) == (3, 16, 16)
    hist = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert hist["step"] == 5 and np.isfinite(hist["loss"])


def test_conditioned_background_is_noised_forward_without_a_unet_call(cond_pixel):
    eng = Engine(cond_pixel, EngineSettings(steps=5, refine=1))
    zbg = torch.randn(3, 3, 32, 32)
    before = eng.evals
    bg = eng.background_trajectory(zbg)
    assert eng.evals == before  # no UNet evaluation
    assert len(bg) == 6 and torch.equal(bg[-1], zbg)
    # The noisiest level is mostly the fixed noise, the same for every crop.
    noise0 = (bg[0] - eng.ddim.alphas[0] ** 0.5 * zbg) / (1 - eng.ddim.alphas[0]) ** 0.5
    assert torch.allclose(noise0[0], noise0[1], atol=1e-5)
    assert 0.9 < float(noise0.std()) < 1.1
    again = Engine(cond_pixel, EngineSettings(steps=5, refine=1)).background_trajectory(zbg)
    assert all(torch.equal(a, b) for a, b in zip(bg, again))
