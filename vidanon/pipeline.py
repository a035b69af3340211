"""The whole data flow of vidanon, wiring only.

run:      probe -> keyring (job pending) -> [decode -> detect -> track] -> plan -> keys
          -> [decode -> align -> engine.anonymize (batched) -> paste -> guard -> encode + audio]
          -> escalate tracks the guard flags, re-render them alone onto the output
          -> sidecar (signed) -> publish video + sidecar together -> keyring (job complete)
recover:  sidecar (verify with the track key) -> [decode -> align with stored transforms
          -> engine.recover (same keyed transform) -> paste -> encode + audio]

Two decoding passes keep memory flat: tracking needs the future of a track (gap filling,
padding) but only as small per-frame landmark records, never frames.

Where the diffusion pass runs is a ``Renderer``: ``LocalRenderer`` (this process, the whole
video at once) or ``vidanon.scale.RayRenderer`` (frame spans on a Ray cluster, joined without
re-encoding).  Planning, keys, the privacy guard's decisions, the sidecar and publishing stay
here, on the driver, for both.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from vidanon import __version__, sidecar
from vidanon.align import crop_transform, transform_scale
from vidanon.detect import make_detector
from vidanon.diffusion.engine import Engine, EngineSettings
from vidanon.diffusion.models import FaceModel, ModelSpec, load_model
from vidanon.errors import KeyMaterialError, SidecarError, VidanonError
from vidanon.guard import (
    THRESHOLD_SOURCE,
    Escalations,
    PrivacyGuard,
    escalated_plan,
    privacy_summary,
)
from vidanon.keys import Key, Keyring, new_job_id, read_track_key, track_key
from vidanon.masks import FaceMasks
from vidanon.media import EncodeSettings, VideoInfo, VideoWriter, probe, read_frames, read_span
from vidanon.render import FaceJob, FrameRenderer
from vidanon.track import FaceTracker, SceneCuts, Track

log = logging.getLogger("vidanon")


@dataclass
class RunResult:
    output: Path
    sidecar: Path
    job_id: str
    tracks: int
    faces: int
    blurred: int
    keyring: Path
    timings: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)


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


def default_output(inp: Path) -> Path:
    return inp.with_name(inp.stem + ".anon.mp4")


def _round_matrix(m: np.ndarray) -> np.ndarray:
    # The sidecar stores 6 decimals; anonymization uses the same rounded numbers as recovery.
    return np.round(m, 6)


def detect_and_track(inp: Path, info, settings: dict, quiet: bool,
                     stats: dict | None = None) -> list[Track]:
    det = settings["detect"]
    trk = settings["track"]
    detector = make_detector(score_threshold=det["score_threshold"], scale=det["scale"])
    tracker = FaceTracker(float(info.fps), trk["lost_buffer_s"], det["score_threshold"])
    is_cut = SceneCuts(float(trk.get("cut_threshold", 0)), float(trk.get("cut_hist", 0.3)))
    for frame in tqdm(read_frames(inp), total=info.frames, desc="detect+track", unit="f",
                      disable=quiet, leave=False):
        if is_cut(frame.image):
            tracker.new_shot(frame.index)
        dets = detector(frame.image)
        if stats is not None:
            stats["detections"] = stats.get("detections", 0) + len(dets)
        tracker.update(frame.index, dets)
    return tracker.finish(info.frames, trk["max_gap"], trk["pad"], trk["smooth"])


def plan_faces(tracks: list[Track], spec, min_eye_px: float) -> dict[int, list[FaceJob]]:
    """Per frame, the faces to replace; faces too small for the model are blurred instead."""
    eye_template = np.linalg.norm(np.subtract(spec.template[1], spec.template[0])) * spec.crop_size
    plan: dict[int, list[FaceJob]] = {}
    for tr in tracks:
        for f in sorted(tr.landmarks):
            m = _round_matrix(crop_transform(tr.landmarks[f], spec))
            eye_px = eye_template / transform_scale(m)
            mode = "diffusion" if eye_px >= min_eye_px else "blur"
            plan.setdefault(f, []).append(FaceJob(tr.id, m, mode))
    return plan


def engine_settings(model: FaceModel, settings: dict) -> EngineSettings:
    """The engine a preset describes for this model (benchmarks build theirs here too)."""
    d = settings["diffusion"]
    return EngineSettings(steps=int(d["steps"]), refine=int(d["refine"]),
                          tol=float(d.get("tol", 0.0)), strength=engine_strength(model, settings),
                          batch_size=int(d["batch_size"]))


def engine_strength(model: FaceModel, settings: dict) -> float:
    """The configured strength, else the one the model was exported with, else 1.0.

    Stored resolved in the sidecar, so recovery uses the same schedule even if the model's
    recommendation changes later.
    """
    return spec_strength(model.spec, settings)


def spec_strength(spec: ModelSpec, settings: dict) -> float:
    """``engine_strength`` from the model's spec alone (a Ray driver never loads the model)."""
    value = settings["diffusion"].get("strength")
    if value is None:
        value = spec.extra.get("engine", {}).get("strength", 1.0)
    return float(value)


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


def _render(src: Path, output: Path, info, model: FaceModel, settings: dict,
            keys: dict[int, Key], plan: dict[int, list[FaceJob]], what: str,
            quiet: bool, observer=None, grow: dict[int, float] | None = None,
            base: Path | None = None, span: Span | None = None,
            masks: FaceMasks | None = None) -> None:
    """Decode ``src``, apply the keyed transform to the planned faces, encode to ``output``.

    ``what`` is "anonymize" or "recover"; both are the same keyed transform (an involution).
    ``masks``: each face's region; ``grow``: tracks whose region is enlarged by that factor.
    ``base``: an earlier output to paint the planned faces onto (cut from ``src``).
    ``span``: only these frames, into a segment file without audio (a Ray work unit); the
    whole output is then ``media.join_parts`` of the segments.
    """
    engine = Engine(model, engine_settings(model, settings))
    transform = engine.anonymize if what == "anonymize" else engine.recover
    if masks is None:  # no traced regions: the model's fixed oval
        masks = FaceMasks(model.spec, "oval", float(settings["faces"]["feather"]))
    renderer = FrameRenderer(model.spec, masks, transform, keys, engine.settings.batch_size,
                             observer=observer, grow=grow)
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


def render_span(model: FaceModel, rp: RenderPass, span: Span, observer=None) -> None:
    """Render ``span`` of a pass into the segment file ``rp.dst`` (a Ray work unit).

    The same loop as a whole pass, from a span boundary where the whole pass holds no frame
    back (``render.batch_boundaries``), so the segment's pixels are the whole pass's.
    """
    _render(rp.src, rp.dst, rp.info, model, rp.settings, rp.keys, rp.plan, "anonymize", True,
            observer=observer, grow=rp.grow, base=rp.base, span=span, masks=rp.masks)


class Renderer(Protocol):
    """Where the diffusion pass runs; everything else in ``run`` is the same for all."""

    spec: ModelSpec

    def begin(self, inp: Path, output: Path, ring: Keyring) -> tuple[str, Key] | None:
        """An unfinished earlier job for ``output`` to continue (its id and master key)."""

    def started(self, job_id: str) -> dict:
        """The job this run works on (new or continued); extra fields for its keyring entry."""

    def render(self, rp: RenderPass, guard: PrivacyGuard | None, quiet: bool) -> None:
        """Write ``rp.dst`` whole (audio included); the guard sees every replaced face."""

    def end(self, error: BaseException | None) -> bool:
        """The job is over (``error`` None: published); True keeps its work for a re-run."""


class LocalRenderer:
    """The model in this process, each pass one decode-transform-encode loop over the video."""

    def __init__(self, model_name: str | None, device: str) -> None:
        self.model = load_model(model_name, device=pick_device(device))
        self.spec = self.model.spec

    def begin(self, inp: Path, output: Path, ring: Keyring) -> tuple[str, Key] | None:
        return None

    def started(self, job_id: str) -> dict:
        return {}

    def render(self, rp: RenderPass, guard: PrivacyGuard | None, quiet: bool) -> None:
        _render(rp.src, rp.dst, rp.info, self.model, rp.settings, rp.keys, rp.plan,
                "anonymize", quiet, observer=guard.observe if guard is not None else None,
                grow=rp.grow, base=rp.base, masks=rp.masks)

    def end(self, error: BaseException | None) -> bool:
        return False


def new_job() -> tuple[str, Key]:
    """A fresh job id and master key.  Tests replace this function (monkeypatch) to compare
    two runs pixel for pixel; there is deliberately no option to fix a key."""
    return new_job_id(), Key.generate()


def _encode_settings(settings: dict) -> EncodeSettings:
    e = settings["encode"]
    return EncodeSettings(codec=e["codec"], crf=int(e["crf"]), preset=e["preset"],
                          lossless=bool(e["lossless"]), pix_fmt=e.get("pix_fmt", "yuv420p"))


def check_output(inp: Path, output: Path, overwrite: bool) -> None:
    """Everything about the output path that can be known before any work is done."""
    if output.is_dir():
        raise VidanonError(f"output {output} is a folder; give a file name, "
                           f"e.g. {output / default_output(inp).name}")
    if not output.parent.is_dir():
        raise VidanonError(f"output folder {output.parent} does not exist")
    if output.exists() and output.resolve() == inp.resolve():
        raise VidanonError("output would overwrite the input")
    if output.exists() and not overwrite:
        raise VidanonError(f"{output} already exists; pass --force to replace it "
                           "(or -o another path)")
    if sidecar.sidecar_path(output).resolve() == inp.resolve():
        raise VidanonError("the output's sidecar would overwrite the input")


def _refuse_silent_zero(inp: Path, info, settings: dict, stats: dict) -> None:
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


def _published(job_id: str, entry: dict) -> bool:
    """Did a dead run's output make it out (killed after publishing, before marking done)?"""
    path = entry.get("output_path")
    if not path:
        return False
    try:
        return sidecar.read(sidecar.sidecar_path(Path(path)))["job_id"] == job_id
    except VidanonError:
        return False


def run(inp: Path, output: Path | None, keyring_path: Path, settings: dict,
        model_name: str | None = None, device: str = "auto", quiet: bool = False,
        passphrase: str | None = None, link_identities: bool = False,
        overwrite: bool = False, renderer: Renderer | None = None) -> RunResult:
    """Anonymize ``inp`` into ``output`` + sidecar; the job's master key goes to the keyring.

    Keys first: the job is in the keyring (status "pending") before anything is rendered,
    so a published output always has its key.  The video and sidecar are rendered under
    temporary names and published together (``vidanon.publish``); only then is the job
    marked "complete".  On any failure the temporary files and the pending job are removed,
    unless the renderer keeps finished work for a re-run (Ray): then the job stays pending.
    """
    from vidanon import publish

    inp = Path(inp)
    output = Path(output) if output else default_output(inp)
    publish.repair(output)  # an earlier run killed while publishing to this path
    check_output(inp, output, overwrite)
    publish.clean_stale(output)
    info = probe(inp)
    if renderer is None:
        renderer = LocalRenderer(model_name or settings.get("model"), device)
    spec = renderer.spec
    # Resolve the model-dependent default now, so the sidecar records what was actually used.
    settings = {**settings, "diffusion": {**settings["diffusion"],
                                          "strength": spec_strength(spec, settings)}}

    ring = Keyring.open(keyring_path, passphrase=passphrase, create=True)
    here = {"host": socket.gethostname(), "pid": os.getpid()}
    resumed = renderer.begin(inp, output, ring)
    job_id, master = resumed if resumed is not None else new_job()
    note = renderer.started(job_id)
    if resumed is not None:
        ring.update_job(job_id, **here, **note)  # this run takes the unfinished job over
    else:
        ring.add_job(job_id, master, {"input": inp.name, "output": output.name,
                                      "created": _now(), "output_path": str(output.resolve()),
                                      **here, **note}, status="pending")
    ring.prune_dead_pending(_published)
    ring.save()
    temps: list[Path] = []
    clock = {"start": time.perf_counter()}
    try:
        stats: dict = {}
        tracks = detect_and_track(inp, info, settings, quiet, stats)
        clock["tracked"] = time.perf_counter()
        if not tracks:
            _refuse_silent_zero(inp, info, settings, stats)
        plan = plan_faces(tracks, spec, float(settings["faces"]["min_eye_px"]))

        # One key per identity: a track's own id, or its group's when identities are linked.
        key_track = {tr.id: tr.id for tr in tracks}
        if link_identities and len(tracks) > 1:
            from vidanon.identity import link_tracks

            key_track = link_tracks(inp, tracks)
        tmp_video = publish.temp_path(output, output.suffix or ".mp4")
        temps.append(tmp_video)
        # Render and check every replaced face; tracks that still match their original are
        # escalated and re-rendered, alone, from the input onto the output made so far.
        g = settings["guard"]
        esc = Escalations(dict(key_track), float(g["mask_grow"]))
        guard = PrivacyGuard(spec, float(g["threshold"])) if g["verify"] else None
        # Face regions are traced once, before rendering, on the original crops: every pass
        # (the guard's re-renders, a Ray worker's segment) then uses the very same regions.
        masks = FaceMasks(spec, settings["faces"]["mask"], float(settings["faces"]["feather"]))
        if masks.uses_landmarks:
            masks.trace(tqdm(read_frames(inp), total=info.frames, desc="face masks", unit="f",
                             disable=quiet, leave=False), plan)

        def keys_now() -> dict[int, Key]:
            return {t: track_key(master, job_id, esc.key_track[t], esc.epoch(t))
                    for t in key_track}

        renderer.render(RenderPass(0, inp, tmp_video, info, settings, plan, keys_now(),
                                   masks=masks), guard, quiet)
        clock["rendered"] = time.perf_counter()
        failing = guard.failing() if guard is not None else []
        rounds = 0
        while failing:
            rounds += 1
            log.info("privacy guard: %d track(s) still match the original; escalating",
                     len(failing))
            esc.escalate(failing)
            guard.reset([t for t in failing if not esc.blurred(t)])
            redo = {f: [j for j in jobs if j.track_id in failing]
                    for f, jobs in escalated_plan(plan, esc).items()}
            nxt = publish.temp_path(output, output.suffix or ".mp4")
            temps.append(nxt)
            renderer.render(RenderPass(rounds, inp, nxt, info, settings, redo, keys_now(),
                                       grow={t: esc.grow(t) for t in failing},
                                       base=tmp_video, masks=masks), guard, quiet)
            os.replace(nxt, tmp_video)
            temps.remove(nxt)
            failing = [t for t in guard.failing() if not esc.blurred(t)]
        clock["escalated"] = time.perf_counter()
        keys = keys_now()
        plan = escalated_plan(plan, esc)
        key_track = esc.key_track
        doc = _build_sidecar(job_id, inp, output, info, spec, settings, tracks, plan, keys,
                             key_track, rendered=tmp_video, guard=guard, esc=esc, masks=masks)
        sidecar.sign(doc, master, keys)
        temps.append(publish.write_temp_sidecar(output, doc))
        publish.publish(temps[0], temps[1], output, overwrite)
    except BaseException as exc:
        for t in temps:
            t.unlink(missing_ok=True)
        if renderer.end(exc):
            raise  # finished work is kept: the job stays pending, for the re-run to continue
        try:
            ring.remove_job(job_id)
            ring.save()
        except Exception:  # the original error matters more; the entry stays "pending"
            log.warning("could not remove pending job %s from the keyring", job_id)
        raise
    renderer.end(None)
    # Published: the job is complete.  If this write fails the output is still recoverable
    # (the job stays "pending" and the sidecar names it), so report rather than fail.
    ring.update_job(job_id, status="complete",
                    key_tracks={str(t): int(k) for t, k in key_track.items()})
    try:
        ring.save()
    except VidanonError as exc:
        log.warning("output written, but the keyring job stays pending: %s", exc)
    side = sidecar.sidecar_path(output)
    faces = sum(len(v) for v in plan.values())
    blurred = sum(j.mode == "blur" for v in plan.values() for j in v)
    privacy = privacy_summary(guard, esc, plan, settings["faces"]["mask"])
    return RunResult(output, side, job_id, len(tracks), faces, blurred, ring.path,
                     privacy=privacy, timings=_timings(clock, guard, masks))


def _timings(clock: dict, guard: PrivacyGuard | None, masks: FaceMasks) -> dict:
    """Where a run's time went; the guard's share is its embeddings plus its re-renders."""
    total = time.perf_counter() - clock["start"]
    guard_s = (guard.seconds if guard else 0.0) + clock["escalated"] - clock["rendered"]
    return {"total_s": round(total, 2),
            "detect_track_s": round(clock["tracked"] - clock["start"], 2),
            "render_s": round(clock["rendered"] - clock["tracked"], 2),
            "mask_trace_s": round(masks.seconds, 2),
            "guard_embed_s": round(guard.seconds, 2) if guard else 0.0,
            "guard_rerender_s": round(clock["escalated"] - clock["rendered"], 2),
            "guard_share": round(guard_s / max(total, 1e-9), 4)}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _build_sidecar(job_id, inp, output, info, spec: ModelSpec, settings, tracks, plan, keys,
                   key_track, rendered: Path | None = None, guard: PrivacyGuard | None = None,
                   esc: Escalations | None = None, masks: FaceMasks | None = None) -> dict:
    sealed = {tr.id: masks.seal(tr.id, keys[tr.id], job_id) for tr in tracks} if masks else {}
    per_track: dict[int, list] = {tr.id: [] for tr in tracks}
    for f in sorted(plan):
        for job in plan[f]:
            per_track[job.track_id].append(
                {"f": f, "m": [float(v) for v in job.matrix.ravel()], "mode": job.mode}
            )
    return {
        "format": sidecar.FORMAT,
        "version": sidecar.VERSION,
        "job_id": job_id,
        "created": _now(),
        "vidanon": __version__,
        "input": {**{k: v for k, v in info.as_dict().items() if k != "path"},
                  "name": inp.name, "sha256": sidecar.file_sha256(inp)},
        "output": {"name": output.name, "sha256": sidecar.file_sha256(rendered or output)},
        "model": spec.as_dict(),
        "settings": settings,
        "linked_identities": {str(t): k for t, k in key_track.items() if t != k},
        "privacy_guard": ({"recogniser": "MobileFaceNet", "threshold": guard.threshold,
                           "threshold_source": THRESHOLD_SOURCE} if guard is not None
                          else {"verified": False}),
        "tracks": [
            {
                "id": tr.id,
                "key_id": keys[tr.id].id,
                "key_track": key_track[tr.id],  # != id when linked to an earlier track
                "first_frame": tr.first,
                "last_frame": tr.last,
                "detected_frames": len(tr.detected),
                **_track_privacy(tr.id, guard, esc),
                **({"mask": sealed[tr.id]} if sealed.get(tr.id) else {}),
                "frames": per_track[tr.id],
            }
            for tr in tracks
        ],
    }


def _track_privacy(tid: int, guard: PrivacyGuard | None, esc: Escalations | None) -> dict:
    """What recovery must repeat (mask growth, key epoch) and what the guard found."""
    out: dict = {}
    if esc is not None and esc.level.get(tid):
        out["key_epoch"] = esc.epoch(tid)
        out["mask_grow"] = esc.grow(tid)
        out["escalations"] = esc.steps(tid)
        if esc.blurred(tid):
            out["note"] = "blurred by the privacy guard: this track cannot be recovered"
    if guard is not None and tid in guard.tracks:
        out["privacy"] = guard.tracks[tid].as_dict(guard.threshold)
    return out


def recovery_masks(doc: dict, spec, keys: dict[int, Key]) -> FaceMasks:
    """The very masks anonymization used, unsealed with the track keys (never re-traced)."""
    faces = doc["settings"]["faces"]
    masks = FaceMasks(spec, faces.get("mask", "oval"), float(faces["feather"]), tracing=False)
    for tid, key in keys.items():
        record = sidecar.track_entry(doc, tid).get("mask")
        if record is not None:
            masks.unseal(tid, key, doc["job_id"], record)
        elif masks.uses_landmarks and any(r["mode"] == "diffusion" for r in
                                          sidecar.track_entry(doc, tid)["frames"]):
            raise SidecarError(f"track {tid}: the sidecar has no face mask record")
    return masks


def recover(video: Path, track_ids: list[int], output: Path | None = None,
            keyring_path: Path | None = None, key_file: Path | None = None,
            model_name: str | None = None, device: str = "auto", quiet: bool = False,
            passphrase: str | None = None, sidecar_file: Path | None = None,
            key_passphrase: str | None = None, overwrite: bool = False) -> Path:
    """Restore the chosen tracks; every other face stays anonymized.

    ``passphrase`` opens the keyring, ``key_passphrase`` an exported key file sealed with
    its own passphrase at export.
    """
    video = Path(video)
    output = Path(output) if output else video.with_name(video.stem + ".recovered.mp4")
    check_output(video, output, overwrite)
    doc = sidecar.read(sidecar_file or sidecar.sidecar_path(video))
    info = probe(video)
    if sidecar.file_sha256(video) != doc["output"]["sha256"]:
        raise SidecarError(f"{video.name} is not the video this sidecar describes (hash differs;"
                           " if a run was killed while replacing it, re-running it restores "
                           "the previous pair)")
    # Key material is read once (an encrypted keyring costs a scrypt derivation per open).
    master = file_key = None
    if key_file is not None:
        job, ktrack, file_key = read_track_key(key_file, key_passphrase)
    elif keyring_path is not None:
        master = Keyring.open(keyring_path, passphrase=passphrase).master(doc["job_id"])
        sidecar.verify(doc, master=master)
    else:
        raise KeyMaterialError("give --keyring or --key-file")
    keys: dict[int, Key] = {}
    for tid in track_ids:
        entry = sidecar.track_entry(doc, tid)
        kt = int(entry.get("key_track", tid))
        if file_key is not None:
            if job != doc["job_id"] or ktrack != kt:
                raise KeyMaterialError(f"key file is for job {job} track {ktrack}, "
                                       f"not job {doc['job_id']} track {tid}")
            key = file_key
        else:
            key = track_key(master, doc["job_id"], kt, int(entry.get("key_epoch", 0)))
        if key.id != entry["key_id"]:
            raise KeyMaterialError(f"wrong key for track {tid}: its key id does not match")
        sidecar.verify(doc, tid, key)
        keys[tid] = key

    settings = doc["settings"]
    settings["diffusion"].setdefault("strength", 1.0)  # sidecars written before strength existed
    dev = pick_device(device)
    model = load_model(model_name or doc["model"]["name"], device=dev)
    if doc["model"]["weights_sha256"] not in ("random", model.spec.weights_sha256):
        raise VidanonError("the model's weights differ from those used to anonymize this video")
    plan: dict[int, list[FaceJob]] = {}
    for tid in keys:
        for rec in sidecar.track_entry(doc, tid)["frames"]:
            if rec["mode"] == "diffusion":
                m = np.asarray(rec["m"], np.float64).reshape(2, 3)
                plan.setdefault(int(rec["f"]), []).append(FaceJob(tid, m, "diffusion"))

    grow = {tid: float(sidecar.track_entry(doc, tid).get("mask_grow", 1.0)) for tid in keys}
    masks = recovery_masks(doc, model.spec, keys)
    _render(video, output, info, model, settings, keys, plan, "recover", quiet, grow=grow,
            masks=masks)
    return output
