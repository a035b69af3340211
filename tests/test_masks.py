"""Face-region masks: FaceMesh contours, presets, and their sealing under the track key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from vidanon.align import crop_transform, oval_mask, warp_crop
from vidanon.detect import make_detector
from vidanon.diffusion.models import tiny_pixel
from vidanon.errors import SidecarError
from vidanon.keys import Key
from vidanon.masks import FACE_OVAL, LEFT_EYE, LIPS_OUTER, RIGHT_EYE, FaceMasks
from vidanon.media import read_frames

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "crowd.mp4"


@pytest.fixture(scope="module")
def spec():
    # The tiny test model with the bundled prior's framing, at the bundled crop size.
    return dataclasses.replace(tiny_pixel().spec, crop_size=128)


@pytest.fixture(scope="module")
def face_crop(spec):
    """The largest face of the sample's 10th frame, aligned as the pipeline aligns it."""
    det = make_detector(score_threshold=0.5, scale=1.0)
    frame = next(f for f in read_frames(SAMPLE) if f.index == 10)
    d = det(frame.image)
    i = int(np.argmax(d.xyxy[:, 2] - d.xyxy[:, 0]))
    return warp_crop(frame.image, crop_transform(d.data["landmarks"][i], spec), spec.crop_size)


def test_contour_orders_follow_facemesh_edges():
    fm = pytest.importorskip("mediapipe.python.solutions.face_mesh")
    for order, edges in ((FACE_OVAL, fm.FACEMESH_FACE_OVAL), (LEFT_EYE, fm.FACEMESH_LEFT_EYE),
                         (RIGHT_EYE, fm.FACEMESH_RIGHT_EYE)):
        ring = {frozenset(e) for e in zip(order, order[1:] + order[:1])}
        assert ring == {frozenset(e) for e in edges}
    lips = {frozenset(e) for e in fm.FACEMESH_LIPS}
    assert {frozenset(e) for e in zip(LIPS_OUTER, LIPS_OUTER[1:] + LIPS_OUTER[:1])} <= lips


def test_face_region_is_traced_and_presets_cut_holes(spec, face_crop):
    face = FaceMasks(spec, "face")
    m, alpha = face.get(1, 0, face_crop)
    assert face.traced == (1, 0)  # FaceMesh found the face
    # Not the fixed oval: the traced region follows this face.
    assert np.mean(m != oval_mask(spec)) > 0.03
    assert alpha[m > 0].min() > 0.99  # replaced pixels are pasted at full weight
    eyes = FaceMasks(spec, "keep-eyes").get(1, 0, face_crop)[0]
    mouth = FaceMasks(spec, "keep-mouth").get(1, 0, face_crop)[0]
    assert 0.02 * m.sum() < (m - eyes).sum() < 0.3 * m.sum()
    assert 0.01 * m.sum() < (m - mouth).sum() < 0.3 * m.sum()
    assert np.all(eyes <= m) and np.all(mouth <= m)
    # The holes are where the eyes and mouth are: the eyes above the mouth.
    ye = np.nonzero(m - eyes)[0].mean()
    ym = np.nonzero(m - mouth)[0].mean()
    assert ye < ym - 0.15 * spec.crop_size


def test_a_track_keeps_its_contour_and_growth_enlarges_it(spec, face_crop):
    masks = FaceMasks(spec, "face")
    a = masks.get(3, 5, face_crop)[0]
    # The contour is stored: a later request (guard re-render) needs no crop and gets the same.
    assert np.array_equal(masks.get(3, 5, None)[0], a)
    assert masks.get(3, 5, None, grow=1.2)[0].sum() > 1.1 * a.sum()


def test_sealed_masks_round_trip_and_refuse_tampering(spec, face_crop):
    key, other = Key.generate(), Key.generate()
    masks = FaceMasks(spec, "keep-mouth")
    for f in range(3):
        masks.get(7, f, face_crop)
    rec = masks.seal(7, key, "job1")
    assert rec["preset"] == "keep-mouth" and "data" in rec
    back = FaceMasks(spec, "keep-mouth", tracing=False)
    back.unseal(7, key, "job1", rec)
    for f in range(3):
        assert np.array_equal(back.get(7, f, None)[0], masks.get(7, f, None)[0])
    with pytest.raises(SidecarError, match="no face mask stored"):
        back.get(7, 3, face_crop)  # recovery never traces a mask of its own
    with pytest.raises(SidecarError, match="altered"):
        FaceMasks(spec, "keep-mouth", tracing=False).unseal(7, other, "job1", rec)
    with pytest.raises(SidecarError, match="altered"):  # moved to another track
        FaceMasks(spec, "keep-mouth", tracing=False).unseal(8, key, "job1", rec)
    data = bytearray(rec["data"].encode())
    data[20] = ord("A") if data[20] != ord("A") else ord("B")
    with pytest.raises(SidecarError, match="altered"):
        FaceMasks(spec, "keep-mouth", tracing=False).unseal(
            7, key, "job1", {**rec, "data": data.decode()})
    with pytest.raises(SidecarError, match="preset"):
        FaceMasks(spec, "face", tracing=False).unseal(7, key, "job1", rec)


def test_no_face_found_falls_back_to_the_oval(spec):
    masks = FaceMasks(spec, "face")
    flat = np.full((128, 128, 3), 127, np.uint8)
    m = masks.get(2, 0, flat)[0]
    assert masks.traced == (0, 1)
    assert np.mean(m != oval_mask(spec)) < 0.01
