"""Geometry between video frames and model crops: similarity transforms, masks, paste-back.

The face mask is a fixed oval in *crop* coordinates (stored with the model), not a per-frame
segmentation: recovery must use exactly the mask that anonymization used, and a segmenter
run on the anonymized face would draw a different one.  The transform per face and frame is
recorded in the sidecar, so recovery re-extracts the very same crop.
"""

from __future__ import annotations

import cv2
import numpy as np

from vidanon.diffusion.models import ModelSpec


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama) mapping points ``src`` onto ``dst``; a 2x3 matrix."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    cov = d0.T @ s0 / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    r = u @ np.diag(sign) @ vt
    var = (s0**2).sum() / len(src)
    scale = (d * sign).sum() / max(var, 1e-12)
    t = md - scale * r @ ms
    return np.hstack([scale * r, t[:, None]])


def crop_transform(landmarks: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Frame -> crop matrix that puts the 5 landmarks on the model's template."""
    return similarity(landmarks, np.asarray(spec.template) * spec.crop_size)


def transform_scale(m: np.ndarray) -> float:
    """Crop pixels per frame pixel; tells how large the face is in the frame."""
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def frame_eye_px(spec: ModelSpec, m: np.ndarray) -> float:
    """Eye distance in the frame of the face that ``m`` (frame -> crop) aligns."""
    return spec.eye_px / transform_scale(m)


def warp_crop(frame: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REPLICATE)


def _border_ramp(size: int) -> np.ndarray:
    """(size, size) weight that is 1 inside and falls to 0 over the outermost ~4 % of a crop."""
    ramp = np.minimum(np.arange(size) + 0.5, size - np.arange(size) - 0.5) / max(2.0, 0.04 * size)
    ramp = np.clip(ramp, 0, 1)
    return np.minimum(ramp[None, :], ramp[:, None]).astype(np.float32)


def oval_mask(spec: ModelSpec, size: int | None = None, grow: float = 1.0) -> np.ndarray:
    """Hard 0/1 face oval in crop coordinates, float32 (size, size); ``grow`` scales its radii
    (the privacy guard's first escalation).

    Clipped to where the paste-back border ramp is 1, so every replaced pixel is pasted at
    full weight: a partial weight would let original face pixels show through.
    """
    size = size or spec.crop_size
    cx, cy, rx, ry = spec.face_oval
    rx, ry = rx * grow, ry * grow
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    inside = ((xx / size - cx) / rx) ** 2 + ((yy / size - cy) / ry) ** 2 <= 1.0
    return (inside & (_border_ramp(size) >= 1.0)).astype(np.float32)


def paste_alpha(spec: ModelSpec, feather: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Blend weight in crop space: 1 on the oval, fading to 0 ``feather`` (crop fraction) outside.

    The feather runs *outwards*, where the generated crop equals the original background, so
    it hides resampling seams without mixing original face pixels into the new face.
    """
    size = spec.crop_size
    hard = oval_mask(spec, size) if mask is None else mask
    dist = cv2.distanceTransform((hard < 0.5).astype(np.uint8), cv2.DIST_L2, 5)
    alpha = np.clip(1.0 - dist / max(feather * size, 1e-6), 0.0, 1.0)
    # Taper to zero at the crop border so no hard crop edge can show in the frame.
    return (alpha * _border_ramp(size)).astype(np.float32)


def _footprint(m: np.ndarray, size: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    pts = corners @ inv.T
    h, w = shape
    x0, y0 = np.floor(pts.min(0)).astype(int) - 2
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 2
    return max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)


def _alpha_in_frame(frame: np.ndarray, m: np.ndarray, alpha: np.ndarray):
    """The face's bounding box in ``frame`` (x0, y0, x1, y1), the box's crop matrix, and
    ``alpha`` (crop space) warped into the box; None when the face lies outside the frame.
    Working on the box only keeps the cost with the face's size, not the frame's."""
    x0, y0, x1, y1 = _footprint(m, alpha.shape[0], frame.shape[:2])
    if x1 <= x0 or y1 <= y0:
        return None
    # Box pixel (u, v) -> crop: m @ (u + x0, v + y0, 1); warp with WARP_INVERSE_MAP.
    shift = m.copy()
    shift[:, 2] += m[:, :2] @ np.array([x0, y0], np.float64)
    a = cv2.warpAffine(alpha, shift, (x1 - x0, y1 - y0),
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return (x0, y0, x1, y1), shift, a


def paste(frame: np.ndarray, crop: np.ndarray, m: np.ndarray, alpha: np.ndarray) -> None:
    """Blend ``crop`` (uint8 BGR, crop space) into ``frame`` in place through the inverse of m."""
    box = _alpha_in_frame(frame, m, alpha)
    if box is None:
        return
    (x0, y0, x1, y1), shift, a = box
    patch = cv2.warpAffine(crop, shift, (x1 - x0, y1 - y0),
                           flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE)
    roi = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = np.clip(roi + a[..., None] * (patch.astype(np.float32) - roi) + 0.5,
                                  0, 255).astype(np.uint8)


def restore(frame: np.ndarray, source: np.ndarray, m: np.ndarray, alpha: np.ndarray) -> None:
    """Put ``source``'s own pixels back into ``frame`` wherever ``alpha`` (crop space) is
    above 0, in place: a re-rendered face starts from the input, not from the face it
    replaces, and its pixels do not depend on what an earlier pass wrote there."""
    box = _alpha_in_frame(frame, m, alpha)
    if box is None:
        return
    (x0, y0, x1, y1), _, a = box
    roi = frame[y0:y1, x0:x1]
    roi[a > 0] = source[y0:y1, x0:x1][a > 0]


def blur_face(frame: np.ndarray, m: np.ndarray, spec: ModelSpec, alpha: np.ndarray) -> None:
    """Irreversible fallback for faces too small for the model: a heavy blur of the oval."""
    size = spec.crop_size
    crop = warp_crop(frame, m, size)
    k = max(3, (size // 3) | 1)
    blurred = cv2.GaussianBlur(cv2.resize(crop, (8, 8), interpolation=cv2.INTER_AREA), (3, 3), 0)
    blurred = cv2.GaussianBlur(cv2.resize(blurred, (size, size), interpolation=cv2.INTER_CUBIC),
                               (k, k), 0)
    paste(frame, blurred, m, alpha)


def to_tensor_batch(crops: list[np.ndarray]):
    """uint8 BGR crops -> float tensor (N,3,S,S) RGB in [-1, 1]."""
    import torch

    arr = np.stack(crops)[..., ::-1].astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def from_tensor_batch(x) -> list[np.ndarray]:
    """float tensor (N,3,S,S) RGB in [-1, 1] -> uint8 BGR crops."""
    arr = ((x.clamp(-1, 1).numpy().transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5).astype(np.uint8)
    return [np.ascontiguousarray(a[..., ::-1]) for a in arr]
