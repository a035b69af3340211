"""Fitting an anonymized crop to its frame: the differentiable path matches the pipeline's
paste and crop, and the fit brings the re-encoded latent closer through the real path."""

import numpy as np
import pytest
import torch

from vidanon.align import (
    from_tensor_batch,
    oval_mask,
    paste,
    paste_alpha,
    to_tensor_batch,
    warp_crop,
)
from vidanon.diffusion.framefit import FrameGeometry, ThroughFrame, fit_to_frame, shrinks
from vidanon.diffusion.models import ModelSpec
from vidanon.prior.autoencoder import load_taef2

SIZE = 128
SPEC = ModelSpec("t", "latent", SIZE, (32, 16, 16), [[0.3, 0.3], [0.7, 0.3], [0.5, 0.5],
                                                    [0.35, 0.7], [0.65, 0.7]],
                 [0.5, 0.52, 0.39, 0.45])


pytestmark = pytest.mark.usefixtures("one_thread")


def _scene(seed: int, scale: float, angle: float):
    """A textured frame, and a rotated crop matrix where the face is ``scale`` of the crop."""
    rng = np.random.default_rng(seed)
    frame = cv2_blur(rng.integers(0, 256, (90, 120, 3)).astype(np.uint8))
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    cx, cy = 60.0, 45.0  # the face's centre in the frame -> the crop's centre
    m = np.array([[c, -s, SIZE / 2 - (c * cx - s * cy)], [s, c, SIZE / 2 - (s * cx + c * cy)]])
    return frame, m


def cv2_blur(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img, (0, 0), 1.5)


def _real_path(frame: np.ndarray, crop_u8: np.ndarray, m: np.ndarray, alpha: np.ndarray):
    f = frame.copy()
    paste(f, crop_u8, m, alpha)
    return warp_crop(f, m, SIZE)


def test_through_frame_matches_paste_and_warp_crop():
    alpha = paste_alpha(SPEC, 0.06, oval_mask(SPEC))
    rng = np.random.default_rng(3)
    crops = cv2_blur(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8))
    scenes = [_scene(0, 0.35, 0.0), _scene(1, 0.6, 0.3)]
    geoms = [FrameGeometry.of(f, m, alpha) for f, m in scenes]
    sim = ThroughFrame(geoms, SIZE)(to_tensor_batch([crops, crops]))
    for (f, m), got in zip(scenes, from_tensor_batch(sim)):
        want = _real_path(f, crops, m, alpha).astype(np.float64)
        err = np.abs(got.astype(np.float64) - want)
        assert err.mean() < 0.5  # uint8 rounding and interpolation tables, not geometry
        # A wrong matrix (no rotation) would be far off:
    wrong = FrameGeometry.of(scenes[1][0], _scene(1, 0.6, 0.0)[1], alpha)
    off = from_tensor_batch(ThroughFrame([wrong], SIZE)(to_tensor_batch([crops])))[0]
    want = _real_path(scenes[1][0], crops, scenes[1][1], alpha).astype(np.float64)
    assert np.abs(off.astype(np.float64) - want).mean() > 5.0
    assert shrinks(scenes[0][1]) and not shrinks(_scene(0, 1.5, 0.2)[1])  # face 0.35 vs 1.5x
    assert FrameGeometry.of(scenes[0][0], scenes[0][1] + [[0, 0, 900], [0, 0, 900]],
                            alpha) is None  # off the frame: nothing to fit


def test_fit_brings_the_frame_read_latent_closer_to_the_target():
    ae = load_taef2()
    alpha = paste_alpha(SPEC, 0.06, oval_mask(SPEC))
    rng = np.random.default_rng(5)
    sharp = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)  # detail a small face loses
    frame, m = _scene(2, 0.35, 0.1)
    geom = FrameGeometry.of(frame, m, alpha)
    x = to_tensor_batch([sharp])
    with torch.no_grad():
        target = ae.encode(x)
    lm = torch.zeros(1, 1, 16, 16)
    lm[..., 4:12, 4:12] = 1
    fitted = fit_to_frame(ae.encode, x, target, lm, ThroughFrame([geom], SIZE), iters=15)
    assert fitted.shape == x.shape and float(fitted.abs().max()) <= 1.0

    def frame_error(crop: torch.Tensor) -> float:
        back = _real_path(frame, from_tensor_batch(crop)[0], m, alpha)
        with torch.no_grad():
            z = ae.encode(to_tensor_batch([back]))
        return float(((z - target) * lm).norm() / (target * lm).norm())

    assert frame_error(fitted) < 0.85 * frame_error(x)


def test_engine_fits_only_crops_with_a_place_in_a_frame():
    from vidanon.diffusion.engine import Engine, EngineSettings
    from vidanon.diffusion.models import tiny_latent
    from vidanon.keys import Key

    model = tiny_latent()
    size = model.spec.crop_size
    rng = np.random.default_rng(0)
    crops = [cv2_blur(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)) for _ in range(2)]
    x = to_tensor_batch(crops)
    masks = torch.zeros(2, 1, size, size)
    masks[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    keys = [Key(rng.bytes(16)) for _ in range(2)]
    alpha = np.ones((size, size), np.float32)
    frame = cv2_blur(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8))
    m = np.array([[2.0, 0, -8.0], [0, 2.0, -8.0]])  # the face is half the crop's size
    geoms = [FrameGeometry.of(frame, m, alpha), None]
    plain = Engine(model, EngineSettings(steps=2, refine=1)).anonymize(x, masks, keys)
    off = Engine(model, EngineSettings(steps=2, refine=1, frame_fit=3)).anonymize(x, masks, keys)
    fitted = Engine(model, EngineSettings(steps=2, refine=1, frame_fit=3)).anonymize(
        x, masks, keys, geoms)
    assert torch.equal(off, plain)  # no places given: nothing fitted
    assert torch.equal(fitted[1], plain[1])  # no place in a frame: left as sampled
    assert float((fitted[0] - plain[0]).abs().max()) > 1e-4
