"""The privacy guard: every replaced face is checked, leaking tracks are escalated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vidanon import sidecar
from vidanon.align import warp_crop
from vidanon.cli import app
from vidanon.diffusion.engine import Engine
from vidanon.diffusion.models import tiny_pixel
from vidanon.guard import MFN_THRESHOLD, PrivacyGuard, threshold_at
from vidanon.media import cut, read_frames

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-pixel", "--set", "diffusion.steps=3", "--set", "diffusion.refine=1",
        "--quiet"]
runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "crowd6.mp4"
    cut(REPO / "samples" / "crowd.mp4", out, 1.0, 6 / 29.97)
    return out


def test_guard_scores_identical_faces_as_a_match_and_noise_as_not():
    g = PrivacyGuard(tiny_pixel().spec)
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    smooth = np.full_like(face, 128)  # MobileFaceNet cosine to the noise "face": ~0.37
    g.observe([(1, 0, 60.0, False), (2, 0, 60.0, False)], [face, face], [face.copy(), smooth])
    assert g.tracks[1].max_similarity > 0.99 and g.failing() == [1]
    assert g.tracks[2].max_similarity < g.tracks[2].threshold == pytest.approx(MFN_THRESHOLD)


def test_small_faces_are_judged_at_the_threshold_of_their_size():
    # Blurs of different people score higher than sharp faces: the guard asks whether the
    # anonymized face matches more than an impostor pair of that size would.
    assert threshold_at(8) > threshold_at(16) > threshold_at(40) >= threshold_at(100)
    assert threshold_at(100) == pytest.approx(MFN_THRESHOLD)
    g = PrivacyGuard(tiny_pixel().spec)

    def pair(c: float, sizes: list[float]) -> None:  # crop pairs whose cosine is c
        u, v = np.array([1.0, 0.0]), np.array([c, np.sqrt(1 - c * c)])
        out = iter([np.tile(u, (len(sizes), 1)), np.tile(v, (len(sizes), 1))])
        g.embed = lambda crops: next(out)
        crops = [np.zeros((8, 8, 3), np.uint8)] * len(sizes)
        g.observe([(t, 0, e, False) for t, e in enumerate(sizes, 1)], crops, crops)

    g.blur_reference = lambda crops, emb: np.zeros(len(crops))  # a blur that removes the person
    c = (threshold_at(8) + MFN_THRESHOLD) / 2  # an impostor score for 8-px faces, not 80
    pair(c, [8.0, 80.0])
    assert g.failing() == [2]
    assert g.tracks[1].threshold == pytest.approx(threshold_at(8))


def test_a_face_no_closer_to_its_original_than_a_blur_is_not_a_match():
    # Dark, featureless faces score ~0.9 against their own blur: the recogniser measures the
    # lack of detail there, and the guard's last resort could never pass either.
    g = PrivacyGuard(tiny_pixel().spec)
    crops = [np.zeros((32, 32, 3), np.uint8)]
    for f, (c, ref, matched) in enumerate(((0.8, 0.9, False), (0.95, 0.9, True),
                                           (0.8, 0.1, True))):
        u, v = np.array([1.0, 0.0]), np.array([c, np.sqrt(1 - c * c)])
        out = iter([u[None], v[None]])
        g.embed = lambda crops, out=out: next(out)
        g.blur_reference = lambda crops, emb, ref=ref: np.full(len(crops), ref)
        g.reset([1])
        g.observe([(1, f, 80.0, False)], crops, crops)  # frame f: a face not seen before
        assert (g.failing() == [1]) is matched, (c, ref)
        assert g.tracks[1].threshold == pytest.approx(max(ref, MFN_THRESHOLD), abs=1e-5)
    # A blurred face is its own reference: never "more similar than a blur".
    out = iter([np.array([[1.0, 0.0]]), np.array([[0.99, np.sqrt(1 - 0.99**2)]])])
    g.embed = lambda crops: next(out)
    g.reset([1])
    g.observe([(1, 9, 80.0, True)], crops, crops)
    assert g.failing() == [] and g.tracks[1].max_similarity == pytest.approx(0.99)
    fixed = PrivacyGuard(tiny_pixel().spec, threshold=0.3)
    assert fixed.threshold_for(8.0) == fixed.threshold_for(80.0) == 0.3


def test_forced_leak_is_escalated_to_blur_and_recorded(clip, tmp_path, monkeypatch):
    # A broken transform that returns its input: every face would be published unchanged.
    monkeypatch.setattr(Engine, "anonymize", lambda self, x, m, k: x.clone())
    out, ring = tmp_path / "leak.anon.mp4", tmp_path / "ring.json"
    res = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST])
    assert res.exit_code == 0, res.output
    doc = sidecar.read(sidecar.sidecar_path(out))
    by_size = doc["privacy_guard"]["threshold"]  # eye px -> threshold, as the guard used it
    assert min(by_size.values()) == pytest.approx(0.4504) and "benchmarks" in \
        doc["privacy_guard"]["threshold_source"]
    escalated = [t for t in doc["tracks"] if t.get("escalations")]
    assert escalated, "the guard let unchanged faces through"
    for t in escalated:
        assert t["escalations"] == ["mask", "key", "blur"]
        assert "cannot be recovered" in t["note"]
        assert all(r["mode"] == "blur" for r in t["frames"])
        # The blur is a written face too: checked on every frame, and it no longer matches.
        assert t["privacy"]["frames_checked"] == len(t["frames"]) and t["privacy"]["passed"]
    line = next(x for x in res.output.splitlines() if x.startswith("privacy:"))
    assert "escalated" in line and " 0 blurred" not in line
    shown = runner.invoke(app, ["inspect", str(sidecar.sidecar_path(out))]).output
    assert "mask -> key -> blur (blurred: not recoverable)" in shown


def test_recovery_after_a_key_escalation(clip, tmp_path, monkeypatch):
    # Fail every track twice (mask, then key), so the output is made with epoch-1 keys.
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        return sorted(self.tracks) if calls["n"] <= 2 else []

    monkeypatch.setattr(PrivacyGuard, "failing", failing)
    out, ring = tmp_path / "esc.anon.mp4", tmp_path / "ring.json"
    res = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST])
    assert res.exit_code == 0, res.output
    doc = sidecar.read(sidecar.sidecar_path(out))
    tr = max(doc["tracks"], key=lambda t: len(t["frames"]))
    assert tr["key_epoch"] == 1 and tr["mask_grow"] == pytest.approx(1.2)
    assert tr["escalations"] == ["mask", "key"]
    rec = tmp_path / "rec.mp4"
    res = runner.invoke(app, ["recover", str(out), "--track", str(tr["id"]), "--keyring",
                              str(ring), "-o", str(rec), "--quiet", "--model", "tiny-pixel"])
    assert res.exit_code == 0, res.output
    # The recovered track's faces are far closer to the originals than the anonymized ones.
    def crops(path):
        frames = {f.index: f.image for f in read_frames(path)}
        return [warp_crop(frames[x["f"]], np.asarray(x["m"]).reshape(2, 3), 32).astype(float)
                for x in tr["frames"]]

    o, a, r = crops(clip), crops(out), crops(rec)
    err_a = np.mean([np.abs(x - y).mean() for x, y in zip(o, a)])
    err_r = np.mean([np.abs(x - y).mean() for x, y in zip(o, r)])
    assert err_r < 0.5 * err_a, (err_a, err_r)


def test_tampered_mask_record_is_refused(clip, tmp_path, monkeypatch):
    calls = {"n": 0}

    def failing(self):
        calls["n"] += 1
        return sorted(self.tracks) if calls["n"] == 1 else []

    monkeypatch.setattr(PrivacyGuard, "failing", failing)
    out, ring = tmp_path / "m.anon.mp4", tmp_path / "ring.json"
    assert runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring),
                               *FAST]).exit_code == 0
    side = sidecar.sidecar_path(out)
    doc = json.loads(side.read_text())
    tr = next(t for t in doc["tracks"] if t.get("mask_grow"))
    tr["mask_grow"] = 1.0  # recovery with the wrong mask would silently give a wrong face
    side.write_text(json.dumps(doc))
    res = runner.invoke(app, ["recover", str(out), "--track", str(tr["id"]), "--keyring",
                              str(ring), "-o", str(tmp_path / "r.mp4"), "--quiet", "--model",
                              "tiny-pixel"])
    assert res.exit_code != 0 and "altered" in res.output


def test_no_verify_skips_the_guard(clip, tmp_path):
    out, ring = tmp_path / "nv.anon.mp4", tmp_path / "ring.json"
    res = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring),
                              "--no-verify", *FAST])
    assert res.exit_code == 0, res.output
    assert "privacy: not verified" in res.output
    doc = sidecar.read(sidecar.sidecar_path(out))
    assert doc["privacy_guard"] == {"verified": False}
    assert not any("privacy" in t for t in doc["tracks"])


def test_steps_that_fail_on_the_worst_frames_are_skipped_without_a_whole_pass(clip, tmp_path,
                                                                             monkeypatch):
    # Unchanged faces fail the larger mask and the new key on their worst frames already:
    # the guard learns that from probes and re-renders the video once, with the blur.
    from vidanon import pipeline
    from vidanon.config import load_settings

    monkeypatch.setattr(Engine, "anonymize", lambda self, x, m, k: x.clone())
    res = pipeline.run(clip, tmp_path / "o.mp4", tmp_path / "ring.json",
                       load_settings(None, ["diffusion.steps=2", "diffusion.refine=0"]),
                       "tiny-pixel", "cpu", quiet=True)
    t = res.timings
    assert t["guard_passes"] == 1 and t["guard_probes"] == 2, t
    assert 0 < t["guard_probe_crops"] <= 2 * 3 * res.tracks  # 3 worst frames per track
    assert res.privacy["faces_blurred"] == res.faces and res.privacy["faces_escalated"] == res.faces


class _TableRenderer:
    """A renderer whose probes "render" by table: margin(track, escalation level, frame)."""

    def __init__(self, esc, margin, ready_faces: int) -> None:
        self.esc, self.margin, self.ready_faces = esc, margin, ready_faces
        self.probed: list[list[tuple[int, int, int]]] = []  # per probe: (track, level, frame)

    def probe(self, rp, frames, guard, keep=None):
        from vidanon.guard import TrackCheck

        seen = []
        for f in frames:
            for j in rp.plan[f]:
                lvl = self.esc.level[j.track_id]
                m = self.margin(j.track_id, lvl, f)
                guard.tracks.setdefault(j.track_id, TrackCheck()).take(
                    TrackCheck(1, 0.5 + m, f, 0.5, margins={f: m}))
                seen.append((j.track_id, lvl, f))
                if keep is not None:
                    keep[(j.track_id, f)] = np.full((2, 2, 3), lvl, np.uint8)
        self.probed.append(seen)


@pytest.mark.parametrize("ready_faces", [2048, 0])
def test_a_step_is_tried_worst_frames_first_and_dropped_where_it_fails(ready_faces):
    # Track 1 failed its first pass; the larger mask (level 1) passes its 3 worst frames but
    # fails frame 30, the 10th worst; the new key (level 2) passes everywhere.
    from vidanon.guard import Escalations, TrackCheck
    from vidanon.passes import RenderPass
    from vidanon.render import FaceJob
    from vidanon.verify import _try_steps

    frames = list(range(40))
    first_margin = {f: -abs(f - 35) / 100 for f in frames}  # worst near frame 35
    order = sorted(frames, key=lambda f: (-first_margin[f], f))
    assert order.index(30) == 9
    g = PrivacyGuard(tiny_pixel().spec)
    g.tracks[1] = TrackCheck(40, 0.6, 35, 0.5, margins=first_margin)
    esc = Escalations({1: 1})
    esc.escalate([1])
    r = _TableRenderer(esc, lambda t, lvl, f: 0.1 if (lvl == 1 and f == 30) else -0.1,
                       ready_faces)
    plan = {f: [FaceJob(1, np.eye(2, 3), "diffusion")] for f in frames}
    first = RenderPass(0, Path("in.mp4"), Path("out.mp4"), None, {}, plan, {})
    stats = {"probes": 0, "probe_crops": 0}
    ready = _try_steps(r, first, g, esc, dict, [1], stats)
    tried = [[f for _, _, f in p] for p in r.probed]
    if ready_faces:
        # Level 1: its 3 worst frames, then 12 more, where frame 30 fails; level 2: 3, 12,
        # then the other 25. The whole track is rendered once under the step that passed.
        assert [len(p) for p in tried] == [3, 12, 3, 12, 25]
        assert sorted(tried[0]) == sorted(order[:3]) and 30 in tried[1]
        assert esc.level[1] == 2 and sorted(f for _, f in ready) == frames
        assert all(int(c[0, 0, 0]) == 2 for c in ready.values())  # level 2's faces only
    else:
        # The renderer transforms every face itself: one probe of the worst frames a step.
        assert [len(p) for p in tried] == [3] and ready == {}
        assert esc.level[1] == 1
    assert stats["probes"] == len(tried) and stats["probe_crops"] == sum(map(len, tried))


def test_an_original_face_is_embedded_once_however_often_it_is_checked():
    g = PrivacyGuard(tiny_pixel().spec, blur_floor=False)
    embedded = []

    def embed(crops):
        embedded.append(len(crops))
        return np.tile([1.0, 0.0], (len(crops), 1))

    g.embed = embed
    crops = [np.zeros((8, 8, 3), np.uint8)] * 2
    g.observe([(1, 0, 60.0, False), (1, 1, 60.0, False)], crops, crops)
    probe = g.fresh()
    probe.observe([(1, 1, 60.0, False), (2, 1, 60.0, False)], crops, crops)
    # Originals: 2, then only track 2's; anonymized: 2 and 2.
    assert embedded == [2, 2, 1, 2]
    assert probe.tracks.keys() == {1, 2} and g.tracks.keys() == {1}
    g.forget([2])
    probe.observe([(1, 1, 60.0, False)], crops[:1], crops[:1])
    assert embedded[-2:] == [1, 1]  # track 1 forgotten: embedded again
    other = [np.ones((8, 8, 3), np.uint8)]  # another video's face at the same (track, frame)
    probe.observe([(1, 1, 60.0, False)], other, other)
    assert embedded[-2:] == [1, 1]


def test_a_re_rendered_face_starts_from_the_input_not_the_earlier_output():
    # The guard's last resort blurs the person, not the replacement written before it.
    from vidanon.masks import FaceMasks
    from vidanon.media import Frame
    from vidanon.render import FaceJob, FrameRenderer

    spec = tiny_pixel().spec
    src = np.full((64, 64, 3), 90, np.uint8)
    base = src.copy()
    base[8:56, 8:56] = 250  # an earlier pass's (bright) replacement
    m = np.array([[1.0, 0.0, -16.0], [0.0, 1.0, -16.0]])  # a 32-px crop at (16, 16)
    fr = FrameRenderer(spec, FaceMasks(spec, "oval"), lambda x, mk, k: x, {}, 8)
    out = list(fr.render([Frame(0, base.copy(), 0, 0.0)], lambda f: [FaceJob(1, m, "blur")],
                         [Frame(0, src, 0, 0.0)]))[0].image
    centre = out[28:36, 28:36].astype(int)
    assert np.abs(centre - 90).max() <= 2, centre.mean()
