"""The benchmark harness's own arithmetic: thresholds, SSIM, the report's headline."""

import json

import numpy as np

from benchmarks import report
from benchmarks._identity import threshold_at_far
from benchmarks.small_faces import detail
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


def test_detail_is_what_a_small_frame_cannot_hold():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)  # pixel noise: all detail
    flat = np.full_like(sharp, 120)
    m = np.ones((2, 64, 64), bool)
    assert detail(flat, m, 0.3) < 1.0
    assert detail(sharp, m, 0.3) > 40
    assert detail(sharp, m, 0.3) > detail(sharp, m, 0.7) > detail(sharp, m, 1.0)


def test_headline_reads_quality_results(tmp_path, monkeypatch):
    cond = {"anonymized": 0.0, "recovered (right key)": 0.9, "recovered (one bit off)": 0.0,
            "attack: x": 0.01}
    q = {"identity_models": {"M": {}},
         "sets": {"faces": {"conditions": {k: {"M": {"above": v}} for k, v in cond.items()}}}}
    (tmp_path / "quality.json").write_text(json.dumps(q))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.headline()
    assert "| faces, M | 0.0 % | 90.0 % | 0.0 % | 1.0 % |" in text


def test_thresholds_by_size_interpolate_and_reach_the_sharp_one():
    from benchmarks.thresholds import by_size

    res = {"template_eye_px": 54.0, "thresholds": {"M": {"8": 0.8, "16": 0.6, "sharp": 0.5}}}
    at = by_size("M", res)
    assert at(8) == 0.8 and at(4) == 0.8  # below the smallest size: its threshold
    assert abs(at(12) - 0.7) < 1e-9
    assert abs(at(35) - 0.55) < 1e-9  # halfway from 16 px to the template's 54 px
    assert at(200) == 0.5


def test_leak_presets_table_sums_clips_and_marks_the_guard(tmp_path, monkeypatch):
    def doc(verified: bool) -> dict:
        clip = {"face_frames": 10, "privacy": {"faces_escalated": 3, "faces_blurred": 1},
                "timings": {"guard_share": 0.12}} if verified else {"face_frames": 10}
        return {"total": {"vidanon": {"matched": 1, "faces": 20, "matched_pct": 5.0},
                          "beyond_blur": {"matched": 0, "faces": 20, "matched_pct": 0.0},
                          "blur": {"matched": 2, "faces": 20, "matched_pct": 10.0}},
                "clips": {"a.mp4": clip, "b.mp4": clip}}
    (tmp_path / "leak_mask_face.json").write_text(json.dumps(doc(True)))
    (tmp_path / "leak_mask_face_noguard.json").write_text(json.dumps(doc(False)))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = report.leak_presets()
    assert ("| `face` | 1 of 20 (5.0 %) | 0 (0.0 %) | 2 (10.0 %) | 0 | on | 6 / 2 of 20 | 12-12 % |"
            in text)
    assert "| off | - | - |" in text and "keep-eyes" not in text


def test_leak_judge_counts_size_thresholds_blur_floor_and_untouched_faces(make_video):
    from benchmarks.leak import judge_clip

    clip = make_video("a.mp4", size=(64, 48), frames=6)

    class FakeJudge:  # one face per frame; the output scores 0.5 / 0.95, the blur 0.6 / 0.8
        calls = 0

        def faces(self, bgr, min_eye_px):
            return [(np.array([10.0, 10.0, 40.0, 40.0]), np.array([[15.0, 20], [35, 20]]))]

        def similarities(self, orig, other, box, pts):
            self.calls += 1
            return {"M": 0.5, "D": 0.95} if self.calls % 2 else {"M": 0.6, "D": 0.8}

    r = judge_clip(FakeJudge(), clip, clip, 2, {"M": lambda e: 0.45, "D": lambda e: 0.9}, 8.0)
    assert r["faces"] == 3 and r["median_eye_px"] == 20.0
    assert r["vidanon"]["M"]["matched"] == 3 and r["blur"]["D"]["matched"] == 0
    # M matches no more than the blur does; D matches beyond it
    assert r["vidanon"]["beyond_blur"]["matched"] == 3
    assert [u[0] for u in r["untouched"]] == [0, 2, 4]  # the same video: nothing replaced
