"""The frame loop shared by ``run`` and ``recover``: batch face crops across frames, transform
them on the model's device, paste them back, and hand frames on in order.

Crops from many frames and tracks go into one engine call (a GPU wants batches of 32-64,
while a frame holds one to a few faces), so a bounded window of frames is held back until
the batch is full.  Memory is bounded by that window, not by the video's length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vidanon.align import (
    blur_face,
    from_tensor_batch,
    paste,
    paste_alpha,
    to_tensor_batch,
    warp_crop,
)
from vidanon.diffusion.models import ModelSpec
from vidanon.keys import Key
from vidanon.media import Frame


@dataclass
class FaceJob:
    """One face in one frame: which track, where (frame -> crop matrix), and how."""

    track_id: int
    matrix: np.ndarray  # 2x3
    mode: str  # "diffusion" or "blur"


# Frames held back at most before a flush, whatever the batch size.
MAX_WINDOW = 64

Transform = Callable[[torch.Tensor, torch.Tensor, Sequence[Key]], torch.Tensor]


# Sees every replaced face: (track id, frame index) per face, the original aligned crops and
# the same crops cut from the finished frames (after paste-back), e.g. the privacy guard.
Observer = Callable[[list[tuple[int, int]], list[np.ndarray], list[np.ndarray]], None]


class FrameRenderer:
    def __init__(self, spec: ModelSpec, mask: np.ndarray, feather: float, transform: Transform,
                 keys: dict[int, Key], batch_size: int, max_window: int = MAX_WINDOW,
                 observer: Observer | None = None,
                 track_masks: dict[int, np.ndarray] | None = None) -> None:
        self.spec = spec
        self.mask = mask
        self.alpha = paste_alpha(spec, feather, mask)
        self.transform = transform
        self.keys = keys
        self.batch_size = batch_size
        self.max_window = max_window
        self.observer = observer
        # Per-track masks (an escalated track's larger mask), with their paste alphas.
        self.track_masks = {t: (m, paste_alpha(spec, feather, m))
                            for t, m in (track_masks or {}).items()}

    def _mask(self, track_id: int) -> tuple[np.ndarray, np.ndarray]:
        return self.track_masks.get(track_id, (self.mask, self.alpha))

    def _flush(self, window: list[tuple[Frame, list[FaceJob], np.ndarray]]) -> Iterator[Frame]:
        crops, where = [], []
        size = self.spec.crop_size
        for wi, (_, jobs, source) in enumerate(window):
            for job in jobs:
                if job.mode == "diffusion":
                    crops.append(warp_crop(source, job.matrix, size))
                    where.append((wi, job))
        if crops:
            x = to_tensor_batch(crops)
            m = torch.from_numpy(np.stack([self._mask(j.track_id)[0] for _, j in where]))[:, None]
            y = from_tensor_batch(self.transform(x, m, [self.keys[j.track_id] for _, j in where]))
            for (wi, job), crop in zip(where, y):
                paste(window[wi][0].image, crop, job.matrix, self._mask(job.track_id)[1])
            if self.observer is not None:
                out = [warp_crop(window[wi][0].image, job.matrix, size) for wi, job in where]
                self.observer([(j.track_id, window[wi][0].index) for wi, j in where], crops, out)
        for frame, jobs, _ in window:
            for job in jobs:
                if job.mode == "blur":
                    blur_face(frame.image, job.matrix, self.spec, self._mask(job.track_id)[1])
            yield frame

    def render(self, frames: Iterable[Frame], plan: Callable[[int], list[FaceJob]],
               sources: Iterable[Frame] | None = None) -> Iterator[Frame]:
        """Transform the planned faces of ``frames``; with ``sources`` (frames in lockstep),
        faces are cut from those and pasted into ``frames``: the privacy guard re-renders
        only its escalated tracks, from the input, onto an already anonymized video."""
        window: list[tuple[Frame, list[FaceJob], np.ndarray]] = []
        pending = 0
        src_iter = iter(sources) if sources is not None else None
        for frame in frames:
            source = next(src_iter).image if src_iter is not None else frame.image
            jobs = plan(frame.index)
            if not jobs and not window:
                yield frame
                continue
            window.append((frame, jobs, source))
            pending += sum(j.mode == "diffusion" for j in jobs)
            if pending >= self.batch_size or len(window) >= self.max_window:
                yield from self._flush(window)
                window, pending = [], 0
        if window:
            yield from self._flush(window)


def batch_boundaries(frames: int, plan: Callable[[int], list[FaceJob]], batch_size: int,
                     max_window: int = MAX_WINDOW) -> list[int]:
    """Frame indices at which ``FrameRenderer.render`` holds no frame back, plus the end
    (``frames``), replaying its batching decisions from the plan alone.

    A span of frames that starts and ends at such points is rendered in exactly the same
    engine batches whether the whole video is rendered at once or the span alone: the UNet's
    arithmetic is batch-invariant only to ~1e-7, and a rounding flip moves output pixels, so
    this is what lets segments rendered on different machines join into the single-machine
    output bit for bit.
    """
    points = []
    window = pending = 0
    for f in range(frames):
        if window == 0:
            points.append(f)
        jobs = plan(f)
        if not jobs and window == 0:
            continue
        window += 1
        pending += sum(j.mode == "diffusion" for j in jobs)
        if pending >= batch_size or window >= max_window:
            window = pending = 0
    points.append(frames)  # the end flushes whatever is held, in both cases
    return points
