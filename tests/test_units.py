"""Small units: settings layering, tracking gap fill/padding/orphans, alignment geometry."""

from pathlib import Path

import numpy as np
import pytest
import supervision as sv

from vidanon.align import crop_transform, paste, paste_alpha, similarity, warp_crop
from vidanon.config import load_settings
from vidanon.diffusion.models import tiny_pixel
from vidanon.errors import VidanonError
from vidanon.track import FaceTracker, Track, fill_gaps, pad_track


def test_presets_layer_and_overrides_are_checked():
    s = load_settings("cctv", ["diffusion.steps=3", "encode.lossless=true"])
    assert s["detect"]["scale"] == 2.0 and s["diffusion"]["steps"] == 3
    assert s["encode"]["lossless"] is True and s["diffusion"]["refine"] == 4  # default.yaml
    assert s["diffusion"]["strength"] is None  # resolved from the model at run time
    assert s["diffusion"]["temperature"] is None and s["diffusion"]["anchor"] is None
    # recoverable (lossless) by default; the publish preset trades that for small files
    assert load_settings()["encode"]["lossless"] is True
    assert load_settings("publish")["encode"]["lossless"] is False
    with pytest.raises(VidanonError, match="unknown setting"):
        load_settings(None, ["diffusion.stpes=3"])
    with pytest.raises(VidanonError, match="no preset"):
        load_settings("nonexistent")


def test_model_defaults_fill_only_what_the_preset_leaves_null():
    from dataclasses import replace

    from vidanon.passes import resolve_diffusion

    spec = tiny_pixel().spec
    s = load_settings(None, ["diffusion.strength=0.5"])
    bare = resolve_diffusion(spec, s)["diffusion"]
    assert bare["strength"] == 0.5 and bare["temperature"] == 1.0  # the model says nothing
    assert bare["anchor"] == 0.0
    rec = replace(spec, extra={**spec.extra, "engine": {"strength": 1.0, "temperature": 0.7}})
    got = resolve_diffusion(rec, s)["diffusion"]
    assert got["strength"] == 0.5 and got["temperature"] == 0.7  # the preset wins over it
    assert s["diffusion"]["temperature"] is None  # the caller's settings are not modified


def test_gap_fill_interpolates_and_padding_holds_pose():
    tr = Track(1)
    for f, x in ((10, 0.0), (14, 40.0)):
        tr.landmarks[f] = np.full((5, 2), x)
        tr.boxes[f] = np.array([x, 0, x + 10, 10.0])
    fill_gaps(tr, max_gap=5)
    assert np.allclose(tr.landmarks[12], 20.0)
    pad_track(tr, 2, 0, 15)
    assert sorted(tr.landmarks) == list(range(8, 15))
    assert np.allclose(tr.landmarks[8], 0.0)
    long_gap = Track(2)
    for f in (0, 30):
        long_gap.landmarks[f] = np.zeros((5, 2))
        long_gap.boxes[f] = np.zeros(4)
    fill_gaps(long_gap, max_gap=5)
    assert sorted(long_gap.landmarks) == [0, 30]  # the face left the scene: no invention


def _det(x: float, score: float = 0.9) -> sv.Detections:
    lm = np.array([[x + 3, 4], [x + 7, 4], [x + 5, 6], [x + 3, 8], [x + 7, 8]], np.float32)
    return sv.Detections(xyxy=np.array([[x, 0, x + 10, 12]], np.float32),
                         confidence=np.array([score], np.float32), data={"landmarks": lm[None]})


def test_tracker_keeps_every_detection_and_one_id_per_face():
    trk = FaceTracker(fps=30, threshold=0.5)
    for f in range(6):
        trk.update(f, _det(100 + f) if f != 3 else sv.Detections.empty())
    tracks = trk.finish(6, max_gap=3, pad=0, smooth=0)
    assert len(tracks) == 1 and tracks[0].id == 1
    assert sorted(tracks[0].landmarks) == list(range(6))  # frame 0 (unconfirmed) and 3 (gap)
    assert tracks[0].detected == {0, 1, 2, 4, 5}


def test_similarity_is_exact_for_a_similarity_and_paste_inverts_warp():
    spec = tiny_pixel().spec
    tmpl = np.asarray(spec.template) * spec.crop_size
    ang, s, t = 0.3, 2.5, np.array([40.0, 25.0])
    r = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    pts = (tmpl @ r.T) * s + t
    m = crop_transform(pts, spec)
    assert np.allclose(np.c_[pts, np.ones(5)] @ m.T, tmpl, atol=1e-6)
    assert np.allclose(similarity(tmpl, tmpl), np.c_[np.eye(2), np.zeros(2)], atol=1e-9)
    frame = np.random.default_rng(0).integers(0, 255, (160, 160, 3), np.uint8)
    crop = warp_crop(frame, m, spec.crop_size)
    out = frame.copy()
    paste(out, np.zeros_like(crop), m, paste_alpha(spec, 0.06))
    assert (out != frame).any() and out[0, 0].tolist() == frame[0, 0].tolist()


def test_tracks_do_not_continue_across_a_scene_cut():
    trk = FaceTracker(fps=30, threshold=0.5)
    for f in range(4):
        if f == 2:
            trk.new_shot(f)
        trk.update(f, _det(100))  # same place before and after the cut: another person
    tracks = trk.finish(4, max_gap=3, pad=0, smooth=0)
    assert [sorted(t.landmarks) for t in tracks] == [[0, 1], [2, 3]]


def test_scene_cut_in_the_sample_splits_tracks():
    from pathlib import Path

    from vidanon.media import probe
    from vidanon.pipeline import detect_and_track

    sample = Path(__file__).resolve().parents[1] / "samples" / "crowd.mp4"
    tracks = detect_and_track(sample, probe(sample), load_settings(), quiet=True)
    # The sample cuts from a speaker to the audience at frame 26: no track spans it.
    assert tracks and all(t.last < 26 or t.first >= 26 for t in tracks)


def test_a_fast_camera_swing_is_not_a_scene_cut():
    from vidanon.media import read_frames
    from vidanon.track import SceneCuts

    clip = Path(__file__).resolve().parents[2] / "shared" / "videos" / (
        "walking_single_person_608x1080.mp4")
    if not clip.exists():
        pytest.skip("shared clips not present")
    is_cut = SceneCuts(20.0)
    # frame 13 changes the grey thumbnail by 27.9 (as much as a real cut), same scene
    assert not any(is_cut(f.image) for f in read_frames(clip) if f.index < 30)
    # a hard cut to a differently coloured scene still counts
    frame = next(iter(read_frames(clip))).image
    assert is_cut(np.ascontiguousarray(255 - frame[:, :, ::-1]))
