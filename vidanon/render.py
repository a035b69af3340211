"""The frame loop shared by ``run`` and ``recover``: batch face crops across frames, transform
them on the model's device, paste them back, and hand frames on in order.

Crops from many frames and tracks go into one engine call (a GPU wants batches of 32-64,
while a frame holds one to a few faces), so a bounded window of frames is held back until
the batch is full.  Memory is bounded by that window, not by the video's length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from vidanon.align import (
    blur_face,
    frame_eye_px,
    from_tensor_batch,
    paste,
    restore,
    to_tensor_batch,
    warp_crop,
)
from vidanon.diffusion.framefit import FrameGeometry, shrinks
from vidanon.diffusion.models import ModelSpec
from vidanon.keys import Key
from vidanon.masks import FaceMasks
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


# Sees every written face: (track id, frame index, eye distance in the frame, blurred) per face,
# the original aligned crops and the same crops cut from the finished frames (after paste-back),
# e.g. the privacy guard.
Observer = Callable[[list[tuple[int, int, float, bool]], list[np.ndarray], list[np.ndarray]],
                    None]


# Transformed crops by (track id, frame index): what a privacy-guard probe rendered and
# checked, kept so that the re-render pass pastes them instead of transforming them again.
Crops = dict[tuple[int, int], np.ndarray]


class FrameRenderer:
    """``masks`` gives each face its region (traced on the original crop, or read back from
    the sidecar for recovery); ``grow`` enlarges the region of escalated tracks. ``ready``:
    faces already transformed (pasted as they are); ``keep``: collects every transformed
    face. ``hold``: tracks whose faces are not worth transforming any more in this pass
    (the privacy guard has already failed them, so a later pass re-renders them whole):
    they get a blur as a placeholder, unchecked."""

    def __init__(self, spec: ModelSpec, masks: FaceMasks, transform: Transform,
                 keys: dict[int, Key], batch_size: int, max_window: int = MAX_WINDOW,
                 observer: Observer | None = None,
                 grow: dict[int, float] | None = None, ready: Crops | None = None,
                 keep: Crops | None = None,
                 hold: Callable[[int], bool] | None = None, fit: bool = False) -> None:
        self.spec = spec
        self.masks = masks
        self.transform = transform
        self.keys = keys
        self.batch_size = batch_size
        self.max_window = max_window
        self.observer = observer
        self.grow = grow or {}
        self.ready = ready or {}
        self.keep = keep
        self.hold = hold
        self.fit = fit  # hand the transform each crop's place in its frame (framefit.py)

    def _flush(self, window: list[tuple[Frame, list[FaceJob], np.ndarray]]) -> Iterator[Frame]:
        crops, where, regions = [], [], []
        size = self.spec.crop_size
        for frame, jobs, source in window:
            if source is not frame.image:  # painting onto an earlier output: undo it first
                for job in jobs:
                    grow = self.grow.get(job.track_id, 1.0)
                    restore(frame.image, source, job.matrix,
                            self.masks.cover(job.track_id, frame.index, grow))
        for wi, (frame, jobs, source) in enumerate(window):
            for job in jobs:
                if job.mode == "diffusion" and self.hold and self.hold(job.track_id):
                    blur_face(frame.image, job.matrix, self.spec, self.masks.oval(1.0)[1])
                elif job.mode == "diffusion":
                    crop = warp_crop(source, job.matrix, size)
                    crops.append(crop)
                    where.append((wi, job))
                    regions.append(self.masks.get(job.track_id, frame.index, crop,
                                                  self.grow.get(job.track_id, 1.0)))
        if crops:
            ids = [(j.track_id, window[wi][0].index) for wi, j in where]
            y = [self.ready.get(k) for k in ids]
            todo = [i for i, c in enumerate(y) if c is None]
            if todo:
                x = to_tensor_batch([crops[i] for i in todo])
                m = torch.from_numpy(np.stack([regions[i][0] for i in todo]))[:, None]
                keys = [self.keys[where[i][1].track_id] for i in todo]
                if self.fit:
                    geoms = [FrameGeometry.of(window[where[i][0]][0].image, where[i][1].matrix,
                                              regions[i][1])
                             if shrinks(where[i][1].matrix) else None for i in todo]
                    out = self.transform(x, m, keys, geoms=geoms)
                else:
                    out = self.transform(x, m, keys)
                for i, c in zip(todo, from_tensor_batch(out)):
                    y[i] = c
            if self.keep is not None:
                self.keep.update(zip(ids, y))
            for (wi, job), crop, (_, alpha) in zip(where, y, regions):
                paste(window[wi][0].image, crop, job.matrix, alpha)
            if self.observer is not None:
                out = [warp_crop(window[wi][0].image, job.matrix, size) for wi, job in where]
                self.observer([(j.track_id, window[wi][0].index,
                                frame_eye_px(self.spec, j.matrix), False) for wi, j in where],
                              crops, out)
        blurred, before, after = [], [], []
        for frame, jobs, source in window:
            for job in (j for j in jobs if j.mode == "blur"):
                original = warp_crop(source, job.matrix, size) if self.observer else None
                alpha = self.masks.oval(self.grow.get(job.track_id, 1.0))[1]
                blur_face(frame.image, job.matrix, self.spec, alpha)
                if original is not None:  # a blur is a written face too: checked
                    blurred.append((job.track_id, frame.index,
                                    frame_eye_px(self.spec, job.matrix), True))
                    before.append(original)
                    after.append(warp_crop(frame.image, job.matrix, size))
        if blurred:
            self.observer(blurred, before, after)
        yield from (frame for frame, _, _ in window)

    def render(self, frames: Iterable[Frame], plan: Callable[[int], list[FaceJob]],
               sources: Iterable[Frame] | None = None) -> Iterator[Frame]:
        """Transform the planned faces of ``frames``; with ``sources`` (frames in lockstep),
        faces are cut from those and pasted into ``frames``: the privacy guard re-renders
        only its escalated tracks, from the input, onto an already anonymized video."""
        window: list[tuple[Frame, list[FaceJob], np.ndarray]] = []
        pending = 0
        src_iter = iter(sources) if sources is not None else None
        for frame in frames:
            source = frame.image
            if src_iter is not None:
                src = next(src_iter)
                source = src.image
                # The output keeps the input's clock: an earlier output read back as the base
                # has its container's time base (MKV: 1 ms), not the input's.
                frame = replace(frame, pts=src.pts, time=src.time, duration=src.duration)
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
