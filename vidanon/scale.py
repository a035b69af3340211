"""Scale-out on a Ray cluster: ``vidanon run INPUT --ray [ADDRESS]``.

The driver (this process) does what needs the whole video or the master key: probing,
detection and tracking, the plan, key derivation, the privacy guard's decisions, joining,
the sidecar, the keyring and publishing (all in ``pipeline.run``, unchanged).  The cluster
does the diffusion: ``SegmentWorker`` actors, each loading the model once, render frame spans
(``units.Unit``) into segment files beside the output, which the driver joins by stream
copy (``media.join_parts``).  Ray places and restarts the actors; the driver only keeps at
most ``per_worker`` units in flight on each (bounded slots, so its memory stays flat however
long the archive) and resubmits a unit whose worker died.

Assumptions, stated in docs/scale.md: every node sees the inputs and the output folder at
the same paths (a shared file system), and has the same vidanon and model installed.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import queue
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vidanon import sidecar
from vidanon.diffusion.engine import Inversions
from vidanon.diffusion.models import FaceModel, ModelSpec, load_model
from vidanon.errors import VidanonError
from vidanon.guard import PrivacyGuard
from vidanon.keys import Key, KeyOpener, Keyring, KeySealer, StaleSession
from vidanon.masks import FaceMasks
from vidanon.media import frame_pts, join_parts
from vidanon.passes import RenderPass, Span, check_device_name, probe
from vidanon.render import Crops, batch_boundaries
from vidanon.units import Unit, UnitResult, WorkDir, choose_spans, unit_digest

try:  # optional dependency: vidanon[ray]
    import ray
except ImportError:  # pragma: no cover - exercised only without the extra
    ray = None

DEFAULT_SEGMENT_FRAMES = 1800  # one minute at 30 fps: about 2 min of an H100 with 2 faces
PER_WORKER = 2  # units in flight per worker: one rendering, one queued behind it
MAX_ATTEMPTS = 4  # a unit is given up (its file fails) after this many lost workers
RESTART_WAIT_S = 120.0  # how long a dead worker may take to come back before it counts


class WorkerLost(VidanonError):
    """A unit lost its worker more than MAX_ATTEMPTS times; finished units are kept."""


class Interrupted(Exception):
    """The run was stopped (Ctrl-C, SIGTERM); finished units are kept for the re-run."""


def require_ray() -> None:
    if ray is None:
        raise VidanonError('--ray needs Ray: pip install "vidanon[ray]"')


@dataclass
class Hello:
    public: bytes
    pid: int
    host: str
    spec: ModelSpec


class SegmentWorker:
    """One model per worker process, loaded once; renders units.

    Made a Ray actor by ``WorkerPool`` (``ray.remote(...)(SegmentWorker)``), so this module
    imports without Ray.  Restarted by Ray if its process dies; a restarted worker has a new
    key pair, so units sealed for the old one are refused (``StaleSession``) and resealed.
    """

    def __init__(self, model_name: str | None, device: str, threads: int) -> None:
        import cv2
        import torch

        from vidanon.diffusion.models import load_model

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        self._opener = KeyOpener()
        self.model = load_model(model_name, device=device)
        self._guards: dict[float, PrivacyGuard] = {}

    def hello(self) -> Hello:
        return Hello(self._opener.public, os.getpid(), socket.gethostname(), self.model.spec)

    def render(self, unit: Unit, sealed: bytes) -> UnitResult:
        from vidanon.passes import render_span

        t0 = time.perf_counter()
        keys = self._opener.open(sealed, unit.aad)
        guard = None
        if unit.verify:
            floor = bool(unit.settings["guard"].get("blur_floor", True))
            guard = self._guards.get((unit.threshold, floor))
            if guard is None:
                guard = self._guards[(unit.threshold, floor)] = PrivacyGuard(
                    self.model.spec, unit.threshold, blur_floor=floor)
            guard.tracks = {}
            guard.forget([])  # per unit: its faces' records are the driver's to keep
        faces = unit.settings["faces"]
        masks = FaceMasks(self.model.spec, faces["mask"] if unit.masks else "oval",
                          float(faces["feather"]), tracing=False)
        for t, record in unit.masks.items():
            masks.unseal(t, keys[t], unit.job_id, record)
        rp = RenderPass(unit.pass_no, unit.src, unit.part, unit.info, unit.settings, unit.plan,
                        keys, unit.grow, unit.base, masks)
        render_span(self.model, rp, unit.span, guard.observe if guard is not None else None)
        return UnitResult(unit.index, unit.part, unit.part.stat().st_size, unit.frames,
                          unit.crops, dict(guard.tracks) if guard is not None else {},
                          time.perf_counter() - t0, f"{socket.gethostname()}:{os.getpid()}")


def _remote_call(actor, unit: Unit, sealed: bytes):  # noqa: ANN001, ANN202
    """The one place task arguments leave the driver (tests record them here)."""
    return actor.render.remote(unit, sealed)


def _cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrapper (its message, not a traceback)."""
    return getattr(exc, "cause", None) or exc


class WorkerPool:
    """Ray actors with the model loaded, and bounded slots on them.

    Not ``ray.util.ActorPool``: several driver threads (one per file in flight) submit units
    and each must get its own results back; ActorPool is single-caller and queues without
    bound.  A slot is taken before a unit is submitted (blocking when all are taken:
    backpressure) and returned when Ray reports the task finished, whoever waits for it.
    """

    def __init__(self, model_name: str | None, device: str = "auto", workers: int | None = None,
                 per_worker: int = PER_WORKER, threads: int = 1) -> None:
        require_ray()
        check_device_name(device)
        if device == "mps":
            raise VidanonError("--device mps cannot be used with --ray")
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = device != "cpu" and gpus > 0
        if device.startswith("cuda") and not gpus:
            raise VidanonError(f"--device {device} asked for, but the cluster has no GPU")
        n = workers or (gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // threads))
        options = ({"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": threads})
        actor = ray.remote(max_restarts=-1, max_task_retries=0, **options)(SegmentWorker)
        self.actors = [actor.remote(model_name, "cuda" if use_gpu else "cpu", threads)
                       for _ in range(n)]
        try:
            hellos: list[Hello] = ray.get([a.hello.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.shutdown()
            raise VidanonError(f"Ray workers did not start: {_cause(exc)}") from None
        self.spec = hellos[0].spec
        self.model_name = model_name
        if any(h.spec.weights_sha256 != self.spec.weights_sha256 for h in hellos):
            self.shutdown()
            raise VidanonError("Ray workers loaded different model weights (is the same "
                               "vidanon installed on every node?)")
        self.pids = [h.pid for h in hellos]
        self.hosts = [h.host for h in hellos]
        self._public = [h.public for h in hellos]
        self._sealer = KeySealer()
        self._locks = [threading.Lock() for _ in self.actors]
        self._free: queue.Queue[int] = queue.Queue()
        for _ in range(per_worker):
            for i in range(n):
                self._free.put(i)
        self._stop = threading.Event()
        self._stats_lock = threading.Lock()
        self.stats = {"units": 0, "frames": 0, "crops": 0, "resubmitted": 0, "resealed": 0,
                      "reused": 0,
                      "worker_s": 0.0}
        self.progress: Progress | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def size(self) -> int:
        return len(self.actors)

    def stop(self) -> None:
        """Make every thread waiting on units give up (``Interrupted``)."""
        self._stop.set()

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def _count(self, key: str, value: float = 1) -> None:
        with self._stats_lock:
            self.stats[key] += value

    def _refresh(self, i: int, stale: bytes) -> None:
        """After a restart: the worker's new public key.  Waits (up to RESTART_WAIT_S) until
        Ray has it up again, so units are not spent on a worker still restarting."""
        with self._locks[i]:
            if self._public[i] != stale:
                return  # another thread did it
            deadline = time.monotonic() + RESTART_WAIT_S
            while not self._stop.is_set():
                try:
                    hello: Hello = ray.get(self.actors[i].hello.remote(), timeout=30)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        return  # the unit's next attempt finds out
                    time.sleep(0.5)
                    continue
                self._public[i] = hello.public
                self.pids[i] = hello.pid
                return

    def _take_slot(self) -> int | None:
        try:
            return self._free.get(timeout=0.2)
        except queue.Empty:
            return None

    def _release(self, i: int) -> None:
        with self._stats_lock:
            self.in_flight -= 1
        self._free.put(i)

    def _submit(self, i: int, unit: Unit, keys: dict[int, Key]) -> tuple[cf.Future, bytes]:
        public = self._public[i]
        sealed = self._sealer.seal(public, {t: keys[t] for t in unit.tracks}, unit.aad)
        with self._stats_lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fut = _remote_call(self.actors[i], unit, sealed).future()
        except BaseException:
            self._release(i)
            raise
        fut.add_done_callback(lambda _f: self._release(i))
        return fut, public

    def run_units(self, units: list[Unit], keys: dict[int, Key],
                  on_done: Callable[[Unit, UnitResult], None] | None = None
                  ) -> dict[int, UnitResult]:
        """Render ``units`` (results by unit index), never more in flight than slots allow."""
        todo = list(reversed(units))
        attempts: dict[int, int] = {}
        running: dict[cf.Future, tuple[Unit, int, bytes]] = {}
        results: dict[int, UnitResult] = {}
        while todo or running:
            if self._stop.is_set():
                raise Interrupted("stopped")
            while todo:
                i = self._take_slot() if not running else self._free_now()
                if i is None:
                    break
                unit = todo.pop()
                fut, public = self._submit(i, unit, keys)
                running[fut] = (unit, i, public)
            if not running:
                continue
            done, _ = cf.wait(running, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                unit, i, public = running.pop(fut)
                try:
                    res: UnitResult = fut.result()
                except StaleSession:
                    self._count("resealed")
                    self._refresh(i, public)
                    todo.append(unit)
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
                    attempts[unit.index] = attempts.get(unit.index, 0) + 1
                    if attempts[unit.index] >= MAX_ATTEMPTS:
                        raise WorkerLost(f"segment {unit.index} lost its worker "
                                         f"{MAX_ATTEMPTS} times ({type(exc).__name__})"
                                         ) from None
                    self._count("resubmitted")
                    self._refresh(i, public)
                    todo.append(unit)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = _cause(exc)
                    if isinstance(cause, VidanonError):
                        raise type(cause)(str(cause)) from None
                    if isinstance(cause, OSError):
                        raise VidanonError(f"segment {unit.index}: "
                                           f"{cause.strerror or cause}") from None
                    raise
                results[unit.index] = res
                self._count("units")
                self._count("frames", res.frames)
                self._count("crops", res.crops)
                self._count("worker_s", res.seconds)
                if on_done is not None:
                    on_done(unit, res)
                self.advance(res.frames)
        return results

    def planned(self, units: int, frames: int) -> None:
        if self.progress is not None:
            self.progress.planned(units, frames)

    def advance(self, frames: int) -> None:
        if self.progress is not None:
            self.progress.advance(frames)

    def _free_now(self) -> int | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return None


class Progress:
    """The run's one bar: frames rendered (so its rate is frames/s), units and files in the
    postfix.  Its total grows as files are planned (a file's frame count is known once the
    driver has probed it), so the ETA covers the files planned so far."""

    def __init__(self, files: int, quiet: bool) -> None:
        self._lock = threading.Lock()
        self.bar = tqdm(total=0, unit="f", desc="vidanon --ray", disable=quiet,
                        dynamic_ncols=True)
        self.files = files
        self.files_done = 0
        self.units = 0
        self.units_done = 0

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"units {self.units_done}/{self.units}, "
                                 f"files {self.files_done}/{self.files}", refresh=False)

    def planned(self, units: int, frames: int) -> None:
        with self._lock:
            self.units += units
            self.bar.total += frames
            self._postfix()
            self.bar.refresh()

    def advance(self, frames: int) -> None:
        with self._lock:
            self.units_done += 1
            self._postfix()
            self.bar.update(frames)

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1
            self._postfix()
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class RayRenderer:
    """``pipeline.Renderer`` for one video: its passes split into units on a WorkerPool."""

    def __init__(self, pool: WorkerPool, segment_frames: int = DEFAULT_SEGMENT_FRAMES) -> None:
        if segment_frames < 1:
            raise VidanonError("--segment-frames must be at least 1")
        self.pool = pool
        self.spec = pool.spec
        self.segment_frames = segment_frames
        self.work: WorkDir | None = None
        self._job = ""
        self._resumed = False
        self._input_sha = ""
        self._pts: list[int] | None = None
        self._pts_read = False
        self._probe_model: FaceModel | None = None
        self._inversions = Inversions()  # the probes', step after step

    def begin(self, inp: Path, output: Path, ring: Keyring) -> tuple[str, Key] | None:
        """Continue the unfinished job in ``<output>.vidanon-work`` if the keyring still
        holds its key and the input is the same; else start clean."""
        self.work = WorkDir(output)
        self._input_sha = sidecar.file_sha256(inp)
        doc = self.work.load()
        job = doc.get("job_id") if doc else None
        if (job and job in ring.jobs and ring.status(job) == "pending"
                and doc.get("input_sha256") == self._input_sha):
            entry = ring.jobs[job]
            if (entry.get("host") == socket.gethostname() and entry.get("pid") != os.getpid()
                    and _alive(int(entry.get("pid") or 0))):
                raise VidanonError(f"{output} is being written by another run "
                                   f"(pid {entry.get('pid')})")
            self._resumed = True
            return job, ring.master(job)
        if job and ring.status(job) == "pending" and _resume_path(ring.jobs.get(job)) == str(
                self.work.path.resolve()):
            ring.remove_job(job)  # its segments are about to go: it can never be resumed
        return None

    def started(self, job_id: str) -> dict:
        assert self.work is not None
        self._job = job_id
        self.work.start(job_id, self._input_sha, keep=self._resumed)
        return {"resume": str(self.work.path.resolve())}

    # The cluster renders every face of a pass itself: a probe on the driver's CPU tries a
    # track's worst frames only, and hands nothing on. Units run in parallel, so none can
    # stop transforming a track that another unit has failed (``LocalRenderer.hold``).
    ready_faces = 0

    def probe(self, rp: RenderPass, frames: list[int], guard: PrivacyGuard,
              keep: Crops | None = None) -> None:
        """On the driver, with its own copy of the model: a few crops are not worth a round
        trip through the cluster, and the keys they need stay here."""
        if self._probe_model is None:
            self._probe_model = load_model(self.pool.model_name, device="cpu")
        probe(self._probe_model, rp, frames, guard.observe, keep, self._inversions)

    def render(self, rp: RenderPass, guard: PrivacyGuard | None, quiet: bool) -> None:
        assert self.work is not None
        if not self._pts_read:
            self._pts = frame_pts(rp.src) if rp.info.frames > 1 else None
            self._pts_read = True
        units = self._units(rp)
        self.pool.planned(len(units), rp.info.frames)
        results: dict[int, UnitResult] = {}
        todo = []
        for u in units:
            done = self.work.finished(u.digest) if rp.number == 0 else None
            if done is not None:
                results[u.index] = done
                self.pool._count("reused")
                self.pool.advance(u.frames)
            else:
                todo.append(u)

        def record(unit: Unit, res: UnitResult) -> None:
            if rp.number == 0:
                self.work.record(unit.digest, res)

        results.update(self.pool.run_units(todo, rp.keys, record))
        ordered = [results[u.index] for u in units]
        if guard is not None:
            for res in ordered:  # frame order, as a single pass would have seen them
                guard.merge(res.checks)
        join_parts([(r.part, u.span.offset) for r, u in zip(ordered, units)], rp.dst, rp.info,
                   audio_from=rp.src)
        if rp.number > 0:
            for r in ordered:
                r.part.unlink(missing_ok=True)

    def _units(self, rp: RenderPass) -> list[Unit]:
        n = rp.info.frames
        batch = int(rp.settings["diffusion"]["batch_size"])
        if self._pts is None or len(self._pts) != n:
            spans = [(0, n)]
        else:
            bounds = batch_boundaries(n, lambda f: rp.plan.get(f, []), batch)
            spans = choose_spans(bounds, n, self.segment_frames)
        g = rp.settings["guard"]
        units = []
        for index, (a, b) in enumerate(spans):
            span = Span(a, b, tuple(self._pts[a:b]) if self._pts else None)
            plan = {f: rp.plan[f] for f in range(a, b) if rp.plan.get(f)}
            tracks = tuple(sorted({j.track_id for jobs in plan.values() for j in jobs}))
            grow = {t: v for t, v in (rp.grow or {}).items() if t in tracks}
            keys = {t: rp.keys[t] for t in tracks}
            digest = unit_digest(self._input_sha, self.spec.weights_sha256, rp.settings, span,
                                 plan, grow, keys)
            masks = {}
            if rp.masks is not None and rp.masks.uses_landmarks:
                masks = {t: m for t in tracks
                         if (m := rp.masks.seal(t, keys[t], self._job, (a, b))) is not None}
            units.append(Unit(self._job, rp.number, index, rp.src, rp.base,
                              self.work.part(rp.number, index), rp.info, rp.settings, span,
                              plan, grow, tracks, bool(g["verify"]), g["threshold"],
                              digest, masks))
        return units

    def end(self, error: BaseException | None) -> bool:
        assert self.work is not None
        keep = (error is not None and self.work.units > 0
                and (isinstance(error, WorkerLost) or not isinstance(error, VidanonError)))
        if not keep:
            self.work.remove()
        return keep


def _resume_path(entry: dict | None) -> str | None:
    return (entry or {}).get("resume")


def _alive(pid: int) -> bool:
    from vidanon.keys import pid_alive

    return pid > 0 and pid_alive(pid)


def connect(address: str | None, quiet: bool) -> None:
    """Join the cluster at ``address`` ("auto": the one this machine belongs to or a new
    local one).  Workers' stdout stays out of the driver's terminal unless asked for."""
    require_ray()
    if ray.is_initialized():
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's notes on GPU env vars
            ray.init(address=None if address in (None, "", "auto", "local") else address,
                     log_to_driver=False, include_dashboard=False,
                     logging_level="ERROR" if quiet else "WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise VidanonError(f"cannot connect to Ray at {address}: {exc}") from None
