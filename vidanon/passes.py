"""Render passes: one decode -> transform -> encode loop over a video (or a span of it).

``run`` asks a ``Renderer`` for whole passes: ``LocalRenderer`` (this process) or
``vidanon.scale.RayRenderer`` (frame spans on a Ray cluster). A pass is described by a
``RenderPass``, so the privacy guard's re-renders and a Ray worker's segment are the same
loop as the first pass, and ``probe`` renders a handful of frames in memory for the guard.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm import tqdm

from vidanon.diffusion.engine import Engine, EngineSettings, Inversions
from vidanon.diffusion.models import FaceModel, ModelSpec, load_model
from vidanon.errors import VidanonError
from vidanon.keys import Key, Keyring
from vidanon.masks import FaceMasks
from vidanon.media import EncodeSettings, VideoInfo, VideoWriter, read_frames, read_span
from vidanon.render import Crops, FaceJob, FrameRenderer, Observer

if TYPE_CHECKING:
    from vidanon.guard import PrivacyGuard

_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?|mps)")


def check_device_name(device: str) -> str:
    if not _DEVICE.fullmatch(device or ""):
        raise VidanonError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def pick_device(device: str = "auto") -> str:
    check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VidanonError(f"--device {device} asked for, but no CUDA GPU is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise VidanonError("--device mps asked for, but MPS is not available")
    return device


def engine_settings(model: FaceModel, settings: dict) -> EngineSettings:
    """The engine a preset describes for this model (benchmarks build theirs here too)."""
    d = resolve_diffusion(model.spec, settings)["diffusion"]
    return EngineSettings(steps=int(d["steps"]), refine=int(d["refine"]),
                          tol=float(d.get("tol", 0.0)), strength=float(d["strength"]),
                          temperature=float(d["temperature"]), anchor=float(d["anchor"]),
                          keep_mean=float(d["keep_mean"]), batch_size=int(d["batch_size"]),
                          frame_fit=int(d.get("frame_fit", 0)))


# Settings a model recommends when the preset leaves them null, and what applies when
# neither says (also what sidecars written before the setting existed were made with).
MODEL_DEFAULTS = {"strength": 1.0, "temperature": 1.0, "anchor": 0.0, "keep_mean": 0.0}


def resolve_diffusion(spec: ModelSpec, settings: dict) -> dict:
    """``settings`` with every null model-dependent diffusion setting taken from the model.

    Resolved before anything is rendered and stored that way in the sidecar, so recovery
    uses the same schedule and noise scale even if the model's recommendation changes later.
    Works from the spec alone: a Ray driver never loads the model.
    """
    d = dict(settings["diffusion"])
    engine = spec.extra.get("engine", {})
    for name, fallback in MODEL_DEFAULTS.items():
        if d.get(name) is None:
            d[name] = float(engine.get(name, fallback))
    return {**settings, "diffusion": d}


@dataclass(frozen=True)
class Span:
    """Frames ``start <= index < stop`` of a video, rendered on their own into a segment file.

    ``pts`` are the span's timestamps (``media.frame_pts``), so a worker can seek instead of
    decoding from the start; the segment is written with pts shifted by ``-pts[0]`` (see
    ``media.join_parts``).  Without timestamps a video is never split (``start`` is 0).
    """

    start: int
    stop: int
    pts: tuple[int, ...] | None = None

    @property
    def offset(self) -> int:
        return self.pts[0] if self.pts else 0


def _frame_renderer(model: FaceModel, settings: dict, keys: dict[int, Key], what: str,
                    masks: FaceMasks | None, grow: dict[int, float] | None,
                    observer: Observer | None, ready: Crops | None = None,
                    keep: Crops | None = None,
                    inversions: Inversions | None = None,
                    hold: Callable[[int], bool] | None = None) -> FrameRenderer:
    """The keyed transform of ``what`` ("anonymize" or "recover") over a pass's faces."""
    engine = Engine(model, engine_settings(model, settings), inversions)
    transform = engine.anonymize if what == "anonymize" else engine.recover
    if masks is None:  # no traced regions: the model's fixed oval
        masks = FaceMasks(model.spec, "oval", float(settings["faces"]["feather"]))
    return FrameRenderer(model.spec, masks, transform, keys, engine.settings.batch_size,
                         observer=observer, grow=grow, ready=ready, keep=keep, hold=hold,
                         fit=what == "anonymize" and engine.settings.frame_fit > 0)


def render_video(src: Path, output: Path, info, model: FaceModel, settings: dict,
            keys: dict[int, Key], plan: dict[int, list[FaceJob]], what: str,
            quiet: bool, observer=None, grow: dict[int, float] | None = None,
            base: Path | None = None, span: Span | None = None,
            masks: FaceMasks | None = None, ready: Crops | None = None,
            hold: Callable[[int], bool] | None = None) -> None:
    """Decode ``src``, apply the keyed transform to the planned faces, encode to ``output``.

    ``what`` is "anonymize" or "recover"; both are the same keyed transform (an involution).
    ``masks``: each face's region; ``grow``: tracks whose region is enlarged by that factor.
    ``base``: an earlier output to paint the planned faces onto (cut from ``src``).
    ``span``: only these frames, into a segment file without audio (a Ray work unit); the
    whole output is then ``media.join_parts`` of the segments.
    ``ready``: faces transformed already (a privacy-guard probe's), pasted as they are;
    ``hold``: tracks to stop transforming (``FrameRenderer``).
    """
    renderer = _frame_renderer(model, settings, keys, what, masks, grow, observer, ready,
                               hold=hold)
    with VideoWriter(output, info, _encode_settings(settings),
                     audio_from=src if span is None else None) as writer:
        if span is None:
            frames = read_frames(base or src)
            sources = read_frames(src) if base is not None else None
        else:
            frames = read_span(base or src, span.start, span.stop, span.pts)
            sources = (read_span(src, span.start, span.stop, span.pts)
                       if base is not None else None)
        frames = tqdm(frames, total=info.frames if span is None else span.stop - span.start,
                      desc=what, unit="f", disable=quiet, leave=False)
        for frame in renderer.render(frames, lambda f: plan.get(f, []), sources):
            if span is not None and frame.pts is not None:
                frame = replace(frame, pts=frame.pts - span.offset)
            writer.write(frame)


@dataclass
class RenderPass:
    """One rendering pass over a whole video, as ``run`` asks a ``Renderer`` for it.

    ``number`` 0 is the first pass; n > 0 the privacy guard's n-th escalation, which paints
    the escalated tracks (the only ones in ``plan``) from ``src`` onto ``base``.
    """

    number: int
    src: Path
    dst: Path
    info: VideoInfo
    settings: dict
    plan: dict[int, list[FaceJob]]
    keys: dict[int, Key]
    grow: dict[int, float] | None = None
    base: Path | None = None
    masks: FaceMasks | None = None  # traced before rendering; None: the fixed oval
    ready: Crops | None = None  # faces a probe transformed already (``LocalRenderer`` only)


def render_span(model: FaceModel, rp: RenderPass, span: Span, observer=None) -> None:
    """Render ``span`` of a pass into the segment file ``rp.dst`` (a Ray work unit).

    The same loop as a whole pass, from a span boundary where the whole pass holds no frame
    back (``render.batch_boundaries``), so the segment's pixels are the whole pass's.
    """
    render_video(rp.src, rp.dst, rp.info, model, rp.settings, rp.keys, rp.plan, "anonymize",
                 True, observer=observer, grow=rp.grow, base=rp.base, span=span, masks=rp.masks)


def probe(model: FaceModel, rp: RenderPass, frames: list[int], observer: Observer,
          keep: Crops | None = None, inversions: Inversions | None = None) -> None:
    """Render the planned faces of ``frames`` only, in memory, for ``observer``; nothing is
    written. The privacy guard tries an escalation on a track's worst frames this way before
    paying for a whole pass: a step that still matches there fails the track anyway.
    ``keep`` collects the transformed faces, for the pass that writes them; ``inversions``
    lets the next step's probe of the same frames skip their inversion."""
    renderer = _frame_renderer(model, rp.settings, rp.keys, "anonymize", rp.masks, rp.grow,
                               observer, keep=keep, inversions=inversions)
    want, last = set(frames), max(frames, default=-1)
    with contextlib.closing(read_frames(rp.src)) as decoded:
        picked = (f for f in itertools.takewhile(lambda f: f.index <= last, decoded)
                  if f.index in want)
        for _ in renderer.render(picked, lambda f: rp.plan.get(f, [])):
            pass


class Renderer(Protocol):
    """Where the diffusion pass runs; everything else in ``run`` is the same for all."""

    spec: ModelSpec

    def begin(self, inp: Path, output: Path, ring: Keyring) -> tuple[str, Key] | None:
        """An unfinished earlier job for ``output`` to continue (its id and master key)."""

    def started(self, job_id: str) -> dict:
        """The job this run works on (new or continued); extra fields for its keyring entry."""

    def render(self, rp: RenderPass, guard: PrivacyGuard | None, quiet: bool) -> None:
        """Write ``rp.dst`` whole (audio included); the guard sees every replaced face."""

    # How many transformed faces a probe may hand to the next ``render`` as ``rp.ready``
    # (0: ``render`` transforms every face itself, so probes stop at a track's worst frames).
    ready_faces: int

    def probe(self, rp: RenderPass, frames: list[int], guard: PrivacyGuard,
              keep: Crops | None = None) -> None:
        """``passes.probe``: the guard sees the planned faces of ``frames``, rendered."""

    def end(self, error: BaseException | None) -> bool:
        """The job is over (``error`` None: published); True keeps its work for a re-run."""


class LocalRenderer:
    """The model in this process, each pass one decode-transform-encode loop over the video.

    ``ready_faces``: transformed faces a probe may hand to the next pass (128-px crops, 2048
    ~100 MB); ``hold``: stop transforming a track once the guard has failed it in a pass.
    Both save work on tracks the guard escalates; with 0 and False a run escalates exactly
    as on a Ray cluster (``RayRenderer``), so the two outputs can be compared bit for bit.
    """

    def __init__(self, model_name: str | None, device: str, ready_faces: int = 2048,
                 hold: bool = True) -> None:
        self.model = load_model(model_name, device=pick_device(device))
        self.spec = self.model.spec
        self.ready_faces = ready_faces
        self.hold = hold
        self.inversions = Inversions()  # the guard's probes, step after step

    def begin(self, inp: Path, output: Path, ring: Keyring) -> tuple[str, Key] | None:
        return None

    def started(self, job_id: str) -> dict:
        return {}

    def render(self, rp: RenderPass, guard: PrivacyGuard | None, quiet: bool) -> None:
        render_video(rp.src, rp.dst, rp.info, self.model, rp.settings, rp.keys, rp.plan,
                     "anonymize", quiet, observer=guard.observe if guard is not None else None,
                     grow=rp.grow, base=rp.base, masks=rp.masks, ready=rp.ready,
                     hold=guard.failed if guard is not None and self.hold else None)

    def probe(self, rp: RenderPass, frames: list[int], guard: PrivacyGuard,
              keep: Crops | None = None) -> None:
        probe(self.model, rp, frames, guard.observe, keep, self.inversions)

    def end(self, error: BaseException | None) -> bool:
        return False


def _encode_settings(settings: dict) -> EncodeSettings:
    e = settings["encode"]
    return EncodeSettings(codec=e["codec"], crf=int(e["crf"]), preset=e["preset"],
                          lossless=bool(e["lossless"]), pix_fmt=e.get("pix_fmt", "yuv420p"))

