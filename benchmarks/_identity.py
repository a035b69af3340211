"""Identity models for the benchmarks: MobileFaceNet (ONNX, shipped) and dlib's ResNet.

Two models because a privacy claim that holds for one face recogniser may not hold for
another. Both embed aligned crops in [-1, 1] (N,3,S,S RGB) and return unit vectors, so
similarity is a dot product.

Geometry is fixed per face: dlib locates its 5 landmarks on the *original* crop, and the
anonymized / recovered versions of that face are embedded at the same landmarks. The question
asked is "is this still the same person", not "can dlib find a face here".
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from vidanon.diffusion.models import ModelSpec, template_points
from vidanon.identity import FaceEmbedder
from vidanon.prior.data import load_dataset
from vidanon.prior.template import detect_landmarks

ROOT = Path(__file__).resolve().parents[1]
FACES128 = ROOT.parent / "shared" / "data" / "faces" / "utkface_crop128.npz"
UTK_TEMPLATE = [[0.2694, 0.2462], [0.6912, 0.2531], [0.4663, 0.472],
                [0.2901, 0.6552], [0.6425, 0.6655]]

DETECT_PX = 128  # YuNet needs more than 64 px; the template was measured at 128 px too
DLIB_SIZE = 256  # crops are upscaled to this before dlib; its chips are 150 px
UTK_SPEC = ModelSpec("utk128", "pixel", 128, (3, 128, 128), UTK_TEMPLATE, [0.5, 0.5, 0.4, 0.45])


def face_rate(faces_rgb: np.ndarray) -> float:
    """Share of images (uint8 RGB) in which the pipeline's detector, YuNet, finds a face:
    a sample or a replacement that it misses is not a face to an onlooker either."""
    big = np.stack([cv2.resize(f, (DETECT_PX, DETECT_PX), interpolation=cv2.INTER_CUBIC)
                    for f in faces_rgb])
    found = ~np.isnan(detect_landmarks(big)).any(axis=(1, 2))
    return float(found.mean())


def to_uint8_rgb(crops: torch.Tensor) -> np.ndarray:
    return ((crops.clamp(-1, 1).numpy().transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5).astype(np.uint8)


class MobileFaceNetId:
    name = "MobileFaceNet"

    def __init__(self, spec: ModelSpec) -> None:
        self._emb = FaceEmbedder()
        self._pts = template_points(spec)

    def prepare(self, originals: torch.Tensor) -> None:
        return None  # aligned crops: the template points are the landmarks

    def embed(self, crops: torch.Tensor, ctx=None) -> np.ndarray:
        imgs = to_uint8_rgb(crops)
        return np.stack([self._emb(np.ascontiguousarray(im[..., ::-1]), self._pts)
                         for im in imgs])


class DlibId:
    name = "dlib ResNet"

    def __init__(self, spec: ModelSpec) -> None:
        import dlib
        import face_recognition_models as frm

        self._dlib = dlib
        self._det = dlib.get_frontal_face_detector()
        self._sp = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        self._rec = dlib.face_recognition_model_v1(frm.face_recognition_model_location())

    def _big(self, crops: torch.Tensor) -> list[np.ndarray]:
        return [cv2.resize(im, (DLIB_SIZE, DLIB_SIZE), interpolation=cv2.INTER_CUBIC)
                for im in to_uint8_rgb(crops)]

    def prepare(self, originals: torch.Tensor) -> list:
        """One dlib landmark set per original crop (HOG box if found, else a fixed box)."""
        s = DLIB_SIZE
        fallback = self._dlib.rectangle(int(0.1 * s), int(0.12 * s), int(0.9 * s), int(0.92 * s))
        shapes = []
        for im in self._big(originals):
            boxes = self._det(im, 0)
            rect = max(boxes, key=lambda r: r.area()) if len(boxes) else fallback
            shapes.append(self._sp(im, rect))
        return shapes

    def embed(self, crops: torch.Tensor, shapes: list) -> np.ndarray:
        out = []
        for im, shape in zip(self._big(crops), shapes, strict=True):
            chip = self._dlib.get_face_chip(im, shape, size=150, padding=0.25)
            e = np.asarray(self._rec.compute_face_descriptor(chip), dtype=np.float64)
            out.append(e / max(float(np.linalg.norm(e)), 1e-9))
        return np.stack(out)


def identity_models(spec: ModelSpec) -> list:
    """MobileFaceNet always; dlib when installed (``pip install -e .[bench]``)."""
    models: list = [MobileFaceNetId(spec)]
    try:
        models.append(DlibId(spec))
    except ImportError as exc:
        print(f"note: dlib identity model skipped ({exc}); pip install -e '.[bench]'")
    return models


def threshold_at_far(emb: np.ndarray, far: float = 1e-3) -> tuple[float, int]:
    """Cosine threshold passed by ``far`` of impostor pairs (all pairs of distinct faces)."""
    sims = emb @ emb.T
    impostor = sims[np.triu_indices(len(emb), 1)]
    return float(np.quantile(impostor, 1 - far)), int(len(impostor))


def adult_faces(n: int = 1000) -> np.ndarray:
    """``n`` adult UTKFace faces (age >= 18 by the label; uint8 128-px crops), the same each
    run: the impostor set of every threshold here."""
    faces, names = load_dataset(FACES128, 128)
    adult = [i for i, nm in enumerate(names) if int(nm.split("_")[0]) >= 18]
    return faces[np.sort(np.random.default_rng(0).permutation(adult)[:n])]


def as_tensor(faces: np.ndarray) -> torch.Tensor:
    """uint8 (N,S,S,3) RGB crops -> (N,3,S,S) in [-1, 1], as the identity models take them."""
    return torch.from_numpy(faces.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1


def thresholds(n: int = 1000, dup: float = 0.9) -> dict[str, dict]:
    """Cosine thresholds at FAR 0.1 % from impostor pairs of sharp 128-px UTKFace faces.

    Impostors are pairs of different adults (age >= 18 by the UTKFace label): UTKFace holds
    many infants, whom recognisers cannot tell apart, and exact duplicate photos (cosine 1.0),
    which put the held-out set's FAR 0.1 % point at 0.68 instead of about 0.44. Pairs that
    MobileFaceNet scores >= ``dup`` (the same photo twice) are dropped for both recognisers.
    """
    x = as_tensor(adult_faces(n))
    embs = {}
    for rec in (MobileFaceNetId(UTK_SPEC), DlibId(UTK_SPEC)):
        ctx = rec.prepare(x)
        embs[rec.name] = np.concatenate(
            [rec.embed(x[i:i + 64], None if ctx is None else ctx[i:i + 64])
             for i in range(0, len(x), 64)])
    iu = np.triu_indices(len(x), 1)
    keep = (embs["MobileFaceNet"] @ embs["MobileFaceNet"].T)[iu] < dup
    out = {}
    for name, e in embs.items():
        sims = (e @ e.T)[iu][keep]
        out[name] = {"threshold": round(float(np.quantile(sims, 0.999)), 4),
                     "impostor_mean": round(float(sims.mean()), 4),
                     "impostor_pairs": int(keep.sum()),
                     "source": f"{len(x)} adult UTKFace faces at 128 px"}
    return out


def cached_thresholds() -> dict[str, dict]:
    """``thresholds()`` once per machine (about 2 CPU-minutes), kept in runs/."""
    f = ROOT / "runs" / "thresholds.json"
    if f.exists():
        cached = json.loads(f.read_text())
        if all("impostor_mean" in v for v in cached.values()):
            return cached
    thr = thresholds()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(thr, indent=1))
    return thr
