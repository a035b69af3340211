"""The whole data flow of vidanon, wiring only.

run:      probe -> [decode -> detect -> track] -> plan per frame -> keys
          -> [decode -> align -> engine.anonymize (batched) -> paste -> encode + audio]
          -> sidecar (signed) ; master key -> keyring
recover:  sidecar (verify with the track key) -> [decode -> align with stored transforms
          -> engine.recover (same keyed transform) -> paste -> encode + audio]

Two decoding passes keep memory flat: tracking needs the future of a track (gap filling,
padding) but only as small per-frame landmark records, never frames.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vidanon import __version__, sidecar
from vidanon.align import crop_transform, oval_mask, transform_scale
from vidanon.detect import make_detector
from vidanon.diffusion.engine import Engine, EngineSettings
from vidanon.diffusion.models import FaceModel, load_model
from vidanon.errors import KeyMaterialError, SidecarError, VidanonError
from vidanon.keys import Key, Keyring, new_job_id, read_track_key, track_key
from vidanon.media import EncodeSettings, VideoWriter, probe, read_frames
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


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise VidanonError("--device cuda asked for, but no CUDA GPU is available")
    return device


def default_output(inp: Path) -> Path:
    return inp.with_name(inp.stem + ".anon.mp4")


def _round_matrix(m: np.ndarray) -> np.ndarray:
    # The sidecar stores 6 decimals; anonymization uses the same rounded numbers as recovery.
    return np.round(m, 6)


def detect_and_track(inp: Path, info, settings: dict, quiet: bool) -> list[Track]:
    det = settings["detect"]
    trk = settings["track"]
    detector = make_detector(score_threshold=det["score_threshold"], scale=det["scale"])
    tracker = FaceTracker(float(info.fps), trk["lost_buffer_s"], det["score_threshold"])
    is_cut = SceneCuts(float(trk.get("cut_threshold", 0)), float(trk.get("cut_hist", 0.3)))
    for frame in tqdm(read_frames(inp), total=info.frames, desc="detect+track", unit="f",
                      disable=quiet, leave=False):
        if is_cut(frame.image):
            tracker.new_shot(frame.index)
        tracker.update(frame.index, detector(frame.image))
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
    value = settings["diffusion"].get("strength")
    if value is None:
        value = model.spec.extra.get("engine", {}).get("strength", 1.0)
    return float(value)


def _render(src: Path, output: Path, info, model: FaceModel, settings: dict,
            keys: dict[int, Key], plan: dict[int, list[FaceJob]], what: str,
            quiet: bool) -> None:
    """Decode ``src``, apply the keyed transform to the planned faces, encode to ``output``.

    ``what`` is "anonymize" or "recover"; both are the same keyed transform (an involution).
    """
    engine = Engine(model, engine_settings(model, settings))
    transform = engine.anonymize if what == "anonymize" else engine.recover
    renderer = FrameRenderer(model.spec, oval_mask(model.spec),
                             float(settings["faces"]["feather"]), transform, keys,
                             engine.settings.batch_size)
    with VideoWriter(output, info, _encode_settings(settings), audio_from=src) as writer:
        frames = tqdm(read_frames(src), total=info.frames, desc=what, unit="f",
                      disable=quiet, leave=False)
        for frame in renderer.render(frames, lambda f: plan.get(f, [])):
            writer.write(frame)


def _encode_settings(settings: dict) -> EncodeSettings:
    e = settings["encode"]
    return EncodeSettings(codec=e["codec"], crf=int(e["crf"]), preset=e["preset"],
                          lossless=bool(e["lossless"]), pix_fmt=e.get("pix_fmt", "yuv420p"))


def run(inp: Path, output: Path | None, keyring_path: Path, settings: dict,
        model_name: str | None = None, device: str = "auto", quiet: bool = False,
        passphrase: str | None = None, link_identities: bool = False) -> RunResult:
    inp = Path(inp)
    output = Path(output) if output else default_output(inp)
    info = probe(inp)
    dev = pick_device(device)
    model = load_model(model_name or settings.get("model"), device=dev)
    spec = model.spec
    # Resolve the model-dependent default now, so the sidecar records what was actually used.
    settings = {**settings, "diffusion": {**settings["diffusion"],
                                          "strength": engine_strength(model, settings)}}

    tracks = detect_and_track(inp, info, settings, quiet)
    plan = plan_faces(tracks, spec, float(settings["faces"]["min_eye_px"]))

    # One key per identity: a track's own id, or its group's when identities are linked.
    key_track = {tr.id: tr.id for tr in tracks}
    if link_identities and len(tracks) > 1:
        from vidanon.identity import link_tracks

        key_track = link_tracks(inp, tracks)

    # Keys first: if the keyring cannot be written, nothing else is.
    job_id = new_job_id()
    master = Key.generate()
    keys = {t: track_key(master, job_id, key_track[t]) for t in key_track}
    ring = Keyring.open(keyring_path, passphrase=passphrase, create=True)
    ring.add_job(job_id, master, {"input": inp.name, "output": output.name,
                                  "created": _now()})
    ring.save()

    _render(inp, output, info, model, settings, keys, plan, "anonymize", quiet)

    doc = _build_sidecar(job_id, inp, output, info, model, settings, tracks, plan, keys,
                         key_track)
    sidecar.sign(doc, master, keys)
    side = sidecar.sidecar_path(output)
    sidecar.write(side, doc)
    faces = sum(len(v) for v in plan.values())
    blurred = sum(j.mode == "blur" for v in plan.values() for j in v)
    return RunResult(output, side, job_id, len(tracks), faces, blurred, ring.path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _build_sidecar(job_id, inp, output, info, model, settings, tracks, plan, keys,
                   key_track) -> dict:
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
        "output": {"name": output.name, "sha256": sidecar.file_sha256(output)},
        "model": model.spec.as_dict(),
        "settings": settings,
        "linked_identities": {str(t): k for t, k in key_track.items() if t != k},
        "tracks": [
            {
                "id": tr.id,
                "key_id": keys[tr.id].id,
                "key_track": key_track[tr.id],  # != id when linked to an earlier track
                "first_frame": tr.first,
                "last_frame": tr.last,
                "detected_frames": len(tr.detected),
                "frames": per_track[tr.id],
            }
            for tr in tracks
        ],
    }


def recover(video: Path, track_ids: list[int], output: Path | None = None,
            keyring_path: Path | None = None, key_file: Path | None = None,
            model_name: str | None = None, device: str = "auto", quiet: bool = False,
            passphrase: str | None = None, sidecar_file: Path | None = None) -> Path:
    """Restore the chosen tracks; every other face stays anonymized."""
    video = Path(video)
    doc = sidecar.read(sidecar_file or sidecar.sidecar_path(video))
    info = probe(video)
    if sidecar.file_sha256(video) != doc["output"]["sha256"]:
        raise SidecarError(f"{video.name} is not the video this sidecar describes (hash differs)")
    # Key material is read once (an encrypted keyring costs a scrypt derivation per open).
    master = file_key = None
    if key_file is not None:
        job, ktrack, file_key = read_track_key(key_file, passphrase)
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
            key = track_key(master, doc["job_id"], kt)
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

    output = Path(output) if output else video.with_name(video.stem + ".recovered.mp4")
    _render(video, output, info, model, settings, keys, plan, "recover", quiet)
    return output
