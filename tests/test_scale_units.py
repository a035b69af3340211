"""The pieces of the Ray path that need no Ray: span boundaries, segment joining, sealed
keys, resumable keyring entries."""

from __future__ import annotations

import dataclasses
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

from vidanon.diffusion.models import tiny_pixel
from vidanon.errors import KeyMaterialError
from vidanon.keys import Key, KeyOpener, Keyring, KeySealer, StaleSession
from vidanon.masks import FaceMasks
from vidanon.media import (
    EncodeSettings,
    Frame,
    VideoWriter,
    frame_pts,
    join_parts,
    probe,
    read_frames,
    read_span,
)
from vidanon.render import FaceJob, FrameRenderer, batch_boundaries
from vidanon.units import choose_spans

REPO = Path(__file__).resolve().parents[1]


def _batches(frames: list[int], plan: dict[int, list[FaceJob]], batch: int) -> list[list]:
    """The (track, frame) groups the renderer sends through the model together."""
    spec = tiny_pixel().spec
    seen: list[list] = []
    r = FrameRenderer(spec, FaceMasks(spec, "oval"), lambda x, m, k: x,
                      {t: Key(bytes(16)) for t in range(4)}, batch,
                      observer=lambda faces, a, b: seen.append(faces))
    images = (Frame(f, np.zeros((64, 64, 3), np.uint8), f, f / 25) for f in frames)
    assert [f.index for f in r.render(images, lambda f: plan.get(f, []))] == frames
    return seen


def test_spans_cut_at_batch_boundaries_render_in_the_same_batches():
    rng = np.random.default_rng(0)
    m = np.array([[1.0, 0, 16], [0, 1.0, 16]])
    plan = {}
    for f in range(120):
        n = int(rng.choice([0, 0, 1, 2, 3]))
        plan[f] = [FaceJob(t, m, "blur" if rng.random() < 0.1 else "diffusion")
                   for t in range(n)]
    bounds = batch_boundaries(120, lambda f: plan.get(f, []), batch_size=5)
    assert bounds[-1] == 120 and len(bounds) > 10
    whole = _batches(list(range(120)), plan, 5)
    spans = choose_spans(bounds, 120, 17)
    assert len(spans) > 3 and spans[0][0] == 0 and spans[-1][1] == 120
    assert all(b - a >= 17 for a, b in spans[:-1])
    pieces = [b for a, z in spans for b in _batches(list(range(a, z)), plan, 5)]
    assert pieces == whole
    # A cut that is not a boundary changes the batches: the check above can fail.
    off = next(f for f in range(1, 120) if f not in bounds)
    split = _batches(list(range(off)), plan, 5) + _batches(list(range(off, 120)), plan, 5)
    assert split != whole


def test_short_tail_joins_the_last_span():
    assert choose_spans([0, 10, 20, 30, 33], 33, 10) == [(0, 10), (10, 20), (20, 33)]
    assert choose_spans([0, 5], 5, 100) == [(0, 5)]


@pytest.mark.parametrize("lossless", [True, False])
def test_segments_join_to_the_whole_video_without_reencoding(lossless, tmp_path):
    src = REPO / "samples" / "crowd.mp4"
    info, pts = probe(src), frame_pts(src)
    full = list(read_frames(src))
    parts = []
    for i, (a, b) in enumerate([(0, 13), (13, 31), (31, 60)]):
        part = tmp_path / f"p{i}.mp4"
        with VideoWriter(part, info, EncodeSettings(lossless=lossless)) as w:
            for f in read_span(src, a, b, pts[a:b]):
                w.write(dataclasses.replace(f, pts=f.pts - pts[a]))
        parts.append((part, pts[a]))
    out = tmp_path / "joined.mp4"
    join_parts(parts, out, info, audio_from=src)
    joined = list(read_frames(out))
    decoded = [f for p, _ in parts for f in read_frames(p)]
    assert [f.pts for f in joined] == pts  # timestamps exact, not rounded to milliseconds
    assert all(np.array_equal(x.image, y.image) for x, y in zip(joined, decoded))
    assert all(np.array_equal(x.image, y.image) for x, y in zip(joined, full)) == lossless
    assert dataclasses.replace(probe(out), path=src) == info


def test_sealed_keys_open_only_in_their_worker_and_unit():
    sealer, worker = KeySealer(), KeyOpener()
    keys = {3: Key.generate(), 7: Key.generate()}
    sealed = sealer.seal(worker.public, keys, b"job/0/1")
    assert worker.open(sealed, b"job/0/1") == keys
    for k in keys.values():
        assert k.reveal() not in sealed and k.hex().encode() not in sealed
    with pytest.raises(KeyMaterialError):
        worker.open(sealed, b"job/0/2")
    with pytest.raises(StaleSession):
        KeyOpener().open(sealed, b"job/0/1")  # a restarted worker has a new key pair
    for secret in (sealer, worker):
        with pytest.raises(TypeError):
            pickle.dumps(secret)


def test_dead_runs_pending_job_is_kept_only_while_its_work_folder_exists(tmp_path):
    work = tmp_path / "out.mp4.vidanon-work"
    work.mkdir()
    ring = Keyring.open(tmp_path / "k.json", create=True)
    for job, resume in (("a" * 16, str(work)), ("b" * 16, str(tmp_path / "gone"))):
        ring.add_job(job, Key.generate(), {"host": socket.gethostname(), "pid": 2**22 + 7,
                                           "resume": resume}, status="pending")
    ring.save()
    other = Keyring.open(tmp_path / "k.json")
    other.prune_dead_pending(lambda job, entry: False)
    other.save()
    assert sorted(Keyring.open(tmp_path / "k.json").jobs) == ["a" * 16]


def test_a_pass_onto_an_earlier_output_keeps_the_inputs_timestamps():
    """A guard re-render reads the output made so far as its base; an MKV base has a 1 ms
    time base, so its pts are not the input's: the written frames must carry the input's."""
    spec = tiny_pixel().spec
    m = np.array([[1.0, 0, 16], [0, 1.0, 16]])
    r = FrameRenderer(spec, FaceMasks(spec, "oval"), lambda x, m, k: x,
                      {0: Key(bytes(16))}, 2)
    blank = np.zeros((64, 64, 3), np.uint8)
    base = [Frame(f, blank, 33 * f, f / 29.97) for f in range(4)]  # ms, as read from MKV
    src = [Frame(f, blank, 1001 * f, f / 29.97, duration=1001) for f in range(4)]
    plan = {1: [FaceJob(0, m, "blur")], 2: [FaceJob(0, m, "diffusion")]}
    out = list(r.render(iter(base), lambda f: plan.get(f, []), iter(src)))
    assert [f.pts for f in out] == [0, 1001, 2002, 3003]
    assert all(f.duration == 1001 for f in out)
