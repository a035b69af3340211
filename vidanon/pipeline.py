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
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vidanon import __version__, publish, sidecar
from vidanon.align import crop_transform, frame_eye_px
from vidanon.detect import make_detector, refuse_silent_zero
from vidanon.diffusion.models import ModelSpec, load_model
from vidanon.errors import KeyMaterialError, SidecarError, VidanonError
from vidanon.guard import (
    SIZE_THRESHOLDS,
    THRESHOLD_SOURCE,
    Escalations,
    PrivacyGuard,
    escalated_plan,
    privacy_summary,
)
from vidanon.keys import Key, Keyring, new_job_id, read_track_key, track_key
from vidanon.masks import FaceMasks
from vidanon.media import probe, read_frames
from vidanon.passes import (
    MODEL_DEFAULTS,
    LocalRenderer,
    Renderer,
    RenderPass,
    pick_device,
    render_video,
    resolve_diffusion,
)
from vidanon.render import FaceJob
from vidanon.track import FaceTracker, SceneCuts, Track
from vidanon.verify import render_verified

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
    plan: dict[int, list[FaceJob]] = {}
    for tr in tracks:
        for f in sorted(tr.landmarks):
            m = _round_matrix(crop_transform(tr.landmarks[f], spec))
            mode = "diffusion" if frame_eye_px(spec, m) >= min_eye_px else "blur"
            plan.setdefault(f, []).append(FaceJob(tr.id, m, mode))
    return plan

def new_job() -> tuple[str, Key]:
    """A fresh job id and master key.  Tests replace this function (monkeypatch) to compare
    two runs pixel for pixel; there is deliberately no option to fix a key."""
    return new_job_id(), Key.generate()

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
    inp = Path(inp)
    output = Path(output) if output else publish.default_output(inp)
    publish.repair(output)  # an earlier run killed while publishing to this path
    publish.check_output(inp, output, overwrite)
    publish.clean_stale(output)
    info = probe(inp)
    if renderer is None:
        renderer = LocalRenderer(model_name or settings.get("model"), device)
    spec = renderer.spec
    # Resolve the model-dependent defaults now, so the sidecar records what was actually used.
    settings = resolve_diffusion(spec, settings)

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
    ring.prune_dead_pending(publish.published)
    ring.save()
    temps: list[Path] = []
    clock = {"start": time.perf_counter()}
    try:
        stats: dict = {}
        tracks = detect_and_track(inp, info, settings, quiet, stats)
        clock["tracked"] = time.perf_counter()
        if not tracks:
            refuse_silent_zero(inp, info, settings, stats)
        plan = plan_faces(tracks, spec, float(settings["faces"]["min_eye_px"]))

        # One key per identity: a track's own id, or its group's when identities are linked.
        key_track = {tr.id: tr.id for tr in tracks}
        if link_identities and len(tracks) > 1:
            from vidanon.identity import link_tracks

            key_track = link_tracks(inp, tracks)
        tmp_video = publish.temp_path(output, output.suffix or ".mp4")
        temps.append(tmp_video)
        # Render and check every written face; tracks that still match their original are
        # escalated and re-rendered, alone, from the input onto the output made so far.
        g = settings["guard"]
        esc = Escalations(dict(key_track), float(g["mask_grow"]))
        guard = (PrivacyGuard(spec, g["threshold"], bool(g["blur_floor"])) if g["verify"]
                 else None)
        # Face regions are traced once, before rendering, on the original crops: every pass
        # (the guard's re-renders, a Ray worker's segment) then uses the very same regions.
        masks = FaceMasks(spec, settings["faces"]["mask"], float(settings["faces"]["feather"]))
        if masks.uses_landmarks:
            masks.trace(tqdm(read_frames(inp), total=info.frames, desc="face masks", unit="f",
                             disable=quiet, leave=False), plan)

        def keys_now() -> dict[int, Key]:
            return {t: track_key(master, job_id, esc.key_track[t], esc.epoch(t))
                    for t in key_track}

        def new_temp() -> Path:
            temps.append(publish.temp_path(output, output.suffix or ".mp4"))
            return temps[-1]

        clock["masked"] = time.perf_counter()
        passes = render_verified(renderer, RenderPass(0, inp, tmp_video, info, settings, plan,
                                                      keys_now(), masks=masks),
                                 guard, esc, keys_now, new_temp, quiet)
        clock["rendered"] = clock["masked"] + passes["first_s"]
        clock["escalated"] = time.perf_counter()
        keys = keys_now()
        plan = escalated_plan(plan, esc)
        key_track = esc.key_track
        doc = _build_sidecar(job_id, inp, output, info, spec, settings, tracks, plan, keys,
                             key_track, rendered=tmp_video, guard=guard, esc=esc, masks=masks)
        sidecar.sign(doc, master, keys)
        tmp_side = publish.write_temp_sidecar(output, doc)
        temps.append(tmp_side)
        publish.publish(tmp_video, tmp_side, output, overwrite)
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
                     privacy=privacy, timings=_timings(clock, guard, masks, passes))


def _timings(clock: dict, guard: PrivacyGuard | None, masks: FaceMasks, passes: dict) -> dict:
    """Where a run's time went. ``guard_share``: the guard's first-pass embeddings plus all
    time after the first pass, over the run. It overstates the cost: the first pass
    skips the tracks the guard fails (their faces are rendered once, after it). Its cost
    proper is the difference to a ``--no-verify`` run (``benchmarks/guard_cost.py``)."""
    total = time.perf_counter() - clock["start"]
    # The first pass's embeddings, then everything after it (re-renders embed too).
    guard_s = passes["first_embed_s"] + clock["escalated"] - clock["rendered"]
    return {"total_s": round(total, 2),
            "detect_track_s": round(clock["tracked"] - clock["start"], 2),
            "render_s": round(clock["rendered"] - clock["tracked"], 2),
            "mask_trace_s": round(masks.seconds, 2),
            "guard_embed_s": round(guard.seconds, 2) if guard else 0.0,
            "guard_rerender_s": round(clock["escalated"] - clock["rendered"], 2),
            "guard_share": round(guard_s / max(total, 1e-9), 4),
            "guard_passes": passes["passes"] - 1, "guard_probes": passes["probes"],
            "guard_probe_crops": passes["probe_crops"]}


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
        "privacy_guard": ({"recogniser": "MobileFaceNet",
                           "threshold": (guard.threshold if guard.threshold is not None
                                         else {str(k): v for k, v in SIZE_THRESHOLDS.items()}),
                           "threshold_source": (THRESHOLD_SOURCE if guard.threshold is None
                                                else "set by the user (guard.threshold)")}
                          if guard is not None
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
        out["privacy"] = guard.tracks[tid].as_dict()
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
    publish.check_output(video, output, overwrite)
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
    for name, value in MODEL_DEFAULTS.items():  # sidecars written before the setting existed
        settings["diffusion"].setdefault(name, value)
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
    render_video(video, output, info, model, settings, keys, plan, "recover", quiet, grow=grow,
                 masks=masks)
    return output
