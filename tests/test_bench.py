"""The benchmark harness's own arithmetic: thresholds, SSIM, the report's headline."""

import json

import numpy as np

from benchmarks import report
from benchmarks._identity import threshold_at_far
from benchmarks.temporal import ssim_map


def test_threshold_at_far_passes_the_stated_share_of_impostors():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(400, 16))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    thr, pairs = threshold_at_far(e, far=0.01)
    sims = (e @ e.T)[np.triu_indices(400, 1)]
    assert pairs == 400 * 399 // 2
    assert abs(float((sims > thr).mean()) - 0.01) < 1e-3


def test_ssim_is_one_for_identical_frames_and_drops_with_noise():
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 80)[None, :, None] + np.zeros((64, 1, 3))
    a = ramp.astype(np.uint8)  # smooth, like most background
    assert np.allclose(ssim_map(a, a), 1.0)
    noisy = np.clip(ramp + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    assert ssim_map(a, noisy).mean() < 0.5


def test_headline_reads_quality_results(tmp_path, monkeypatch):
    cond = {"anonymized": 0.0, "recovered (right key)": 0.9, "recovered (one bit off)": 0.0,
            "attack: x": 0.01}
    q = {"identity_models": {"M": {}},
         "sets": {"faces": {"conditions": {k: {"M": {"above": v}} for k, v in cond.items()}}}}
    (tmp_path / "quality.json").write_text(json.dumps(q))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.headline()
    assert "| faces, M | 0.0 % | 90.0 % | 0.0 % | 1.0 % |" in text
