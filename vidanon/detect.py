"""Face detection: YuNet (OpenCV, MIT, 230 kB) with boxes, 5 landmarks and scores.

YuNet ships inside the package and runs through OpenCV's DNN module, so detection works
offline with no extra runtime.  Results are ``supervision.Detections`` with the landmarks in
``data["landmarks"]`` (N, 5, 2), in the template order: image-left eye, image-right eye, nose,
image-left mouth corner, image-right mouth corner.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import supervision as sv

from vidanon.errors import VidanonError
from vidanon.media import read_frames

# OpenCV's DNN engine warns on every model load that it ignores target hints; silence it.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

YUNET_PATH = Path(__file__).resolve().parent / "assets" / "face_detection_yunet_2023mar.onnx"


def empty_detections() -> sv.Detections:
    return sv.Detections(
        xyxy=np.zeros((0, 4), np.float32),
        confidence=np.zeros((0,), np.float32),
        data={"landmarks": np.zeros((0, 5, 2), np.float32)},
    )


class YuNetDetector:
    """Callable frame -> Detections.

    ``scale`` resizes the frame before detection: > 1 finds the small, far-away faces of CCTV
    footage (YuNet's smallest anchor is ~10 px), < 1 trades those for speed on large frames.
    """

    def __init__(self, score_threshold: float = 0.6, nms_threshold: float = 0.3,
                 scale: float = 1.0, model_path: Path | None = None) -> None:
        self.scale = float(scale)
        self.score_threshold = score_threshold
        self._net = cv2.FaceDetectorYN.create(
            str(model_path or YUNET_PATH), "", (320, 320), score_threshold, nms_threshold, 5000
        )
        self._size: tuple[int, int] | None = None

    def __call__(self, frame: np.ndarray) -> sv.Detections:
        img = frame
        if self.scale != 1.0:
            img = cv2.resize(frame, None, fx=self.scale, fy=self.scale,
                             interpolation=cv2.INTER_LINEAR if self.scale > 1 else cv2.INTER_AREA)
        h, w = img.shape[:2]
        if self._size != (w, h):
            self._net.setInputSize((w, h))
            self._size = (w, h)
        _, faces = self._net.detect(img)
        if faces is None or len(faces) == 0:
            return empty_detections()
        faces = faces.astype(np.float32) / np.float32(self.scale)
        faces[:, 14] *= self.scale  # the score is not a coordinate
        xyxy = np.column_stack([faces[:, 0], faces[:, 1], faces[:, 0] + faces[:, 2],
                                faces[:, 1] + faces[:, 3]])
        return sv.Detections(
            xyxy=xyxy.astype(np.float32),
            confidence=faces[:, 14].astype(np.float32),
            data={"landmarks": faces[:, 4:14].reshape(-1, 5, 2).astype(np.float32)},
        )


def make_detector(name: str = "yunet", **kwargs) -> YuNetDetector:
    if name != "yunet":
        from vidanon.errors import VidanonError

        raise VidanonError(f"unknown detector {name!r} (available: yunet)")
    return YuNetDetector(**kwargs)


def refuse_silent_zero(inp: Path, info, settings: dict, stats: dict) -> None:
    """A run that finds no face must not look like success if faces are there to be found.

    Either the detector saw faces that tracking dropped, or non-default detection settings
    found nothing where the default detector (on a sample of frames) finds faces.
    """
    if stats.get("detections", 0):
        raise VidanonError(f"{stats['detections']} face detections but no face track: check "
                           "the track.* settings; nothing was written")
    from vidanon.config import load_settings

    default = load_settings()["detect"]
    det = settings["detect"]
    if all(float(det[k]) == float(default[k]) for k in ("score_threshold", "scale")):
        return
    detector = make_detector(score_threshold=default["score_threshold"], scale=default["scale"])
    step = max(1, int(info.frames or 1) // 24)
    hits = sum(1 for frame in read_frames(inp) if frame.index % step == 0
               and len(detector(frame.image)))
    if hits:
        shown = ", ".join(f"detect.{k}={det[k]}" for k in ("score_threshold", "scale"))
        raise VidanonError(f"no face found with {shown}, but the default detector finds faces "
                           f"in {hits} sampled frames; nothing was written")


