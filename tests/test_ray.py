"""Scale-out on a local Ray instance (2 CPUs, 2 workers, the tiny random model).

What must hold: the same job (fixed master key, the ``pipeline.new_job`` hook) gives the
same decoded frames, audio and sidecar on Ray as on one machine, whether a video is split
into segments or a folder is spread over workers, with a worker killed mid-run, and after
an interrupted run is resumed; and no key ever shows up in what Ray records.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from vidanon import pipeline, scale, sidecar  # noqa: E402
from vidanon.cli import app  # noqa: E402
from vidanon.config import load_settings  # noqa: E402
from vidanon.keys import Key, Keyring, track_key  # noqa: E402
from vidanon.media import cut, frame_pts, read_frames, read_span  # noqa: E402
from vidanon.passes import LocalRenderer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# A strict guard (no blur floor) so the tiny model's faces are escalated: re-render passes
# and probes are covered.
OVERRIDES = ["diffusion.steps=2", "diffusion.refine=0", "diffusion.batch_size=8",
             "guard.blur_floor=false"]
CLI = ["--model", "tiny-pixel", "--quiet", *[a for o in OVERRIDES for a in ("--set", o)]]
JOB = ("0a1b2c3d4e5f6071", Key(bytes(range(16))))
runner = CliRunner()
RECORDED: list[bytes] = []  # every task's arguments and result, as Ray serialises them
JOBS: list[tuple[str, Key]] = [JOB]  # every job run here, for the key scan at the end


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """One local Ray instance and two workers for the whole module (starting costs ~15 s)."""
    import cv2
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting; the reference runs match it
    cv2.setNumThreads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    p = scale.WorkerPool("tiny-pixel", "cpu", 2)
    original = scale._remote_call

    def recording(actor, unit, sealed):
        RECORDED.append(ray.cloudpickle.dumps((unit, sealed)))
        ref = original(actor, unit, sealed)
        ref.future().add_done_callback(
            lambda f: f.exception() or RECORDED.append(ray.cloudpickle.dumps(f.result())))
        return ref

    scale._remote_call = recording
    try:
        yield p
    finally:
        scale._remote_call = original
        p.shutdown()
        ray.shutdown()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """30 frames of the sample, re-encoded with B-frames (so seeking must reorder)."""
    out = tmp_path_factory.mktemp("long") / "crowd30.mp4"
    cut(REPO / "samples" / "crowd.mp4", out, 0.0, 30 / 29.97)
    return out


def _single(inp: Path, out: Path, ring: Path, job=JOB) -> pipeline.RunResult:
    """One machine, escalating as a cluster does (no faces handed from probes to passes,
    no held tracks), so the outputs must agree bit for bit."""
    original = pipeline.new_job
    pipeline.new_job = lambda: job
    try:
        return pipeline.run(inp, out, ring, load_settings(None, OVERRIDES), "tiny-pixel",
                            "cpu", quiet=True,
                            renderer=LocalRenderer("tiny-pixel", "cpu", ready_faces=0,
                                                   hold=False))
    finally:
        pipeline.new_job = original


def _on_ray(pool, inp: Path, out: Path, ring: Path, segment: int) -> pipeline.RunResult:
    original = pipeline.new_job
    pipeline.new_job = lambda: JOB
    try:
        return pipeline.run(inp, out, ring, load_settings(None, OVERRIDES), "tiny-pixel",
                            "cpu", quiet=True, renderer=scale.RayRenderer(pool, segment))
    finally:
        pipeline.new_job = original


@pytest.fixture(scope="module")
def reference(pool, long_video, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("single")
    res = _single(long_video, d / "crowd30.anon.mp4", d / "ring.json")
    assert res.privacy["tracks_escalated"] >= 1  # the guard's re-render passes are covered
    return res.output


def _audio(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(audio=0) if p.size]


def assert_same_output(a: Path, b: Path, master: Key | None = None) -> None:
    """Same frames (pixels, timestamps), audio packets and sidecar, apart from the creation
    time and what depends on the file's bytes (its hash and the tags over it)."""
    fa, fb = list(read_frames(a)), list(read_frames(b))
    assert len(fa) == len(fb) > 0
    for x, y in zip(fa, fb):
        assert x.pts == y.pts and np.array_equal(x.image, y.image), x.index
    assert _audio(a) == _audio(b) and _audio(a)
    da = json.loads(sidecar.sidecar_path(a).read_text())
    db = json.loads(sidecar.sidecar_path(b).read_text())
    for d in (da, db):
        d.pop("created"), d.pop("auth"), d["output"].pop("sha256")
    assert da == db
    doc = sidecar.read(sidecar.sidecar_path(b))
    assert doc["output"]["sha256"] == sidecar.file_sha256(b)
    if master is not None:
        sidecar.verify(doc, master=master)


def test_seek_reads_the_same_frames_as_decoding_from_the_start(long_video):
    pts = frame_pts(long_video)
    full = list(read_frames(long_video))
    for a, b in [(1, 5), (11, 23), (29, 30)]:
        got = list(read_span(long_video, a, b, pts[a:b]))
        assert [f.index for f in got] == list(range(a, b))
        assert all(np.array_equal(f.image, g.image) and f.pts == g.pts
                   for f, g in zip(got, full[a:b]))


def test_long_video_split_equals_single_machine(pool, long_video, reference, tmp_path):
    before = dict(pool.stats)
    out, ring = tmp_path / "crowd30.anon.mp4", tmp_path / "ring.json"
    res = _on_ray(pool, long_video, out, ring, segment=8)
    assert pool.stats["units"] - before["units"] >= 4  # split into segments, several passes
    assert 2 <= pool.max_in_flight <= 2 * pool.size  # bounded, and more than one at a time
    assert_same_output(reference, out, JOB[1])
    ring_doc = Keyring.open(ring)
    assert ring_doc.status(res.job_id) == "complete"
    assert not (tmp_path / "crowd30.anon.mp4.vidanon-work").exists()


def test_killed_worker_still_gives_the_same_output(pool, long_video, reference, tmp_path):
    before = dict(pool.stats)
    out, ring = tmp_path / "crowd30.anon.mp4", tmp_path / "ring.json"
    failure: list[BaseException] = []

    def work():
        try:
            _on_ray(pool, long_video, out, ring, segment=4)
        except BaseException as exc:  # reported by the assertion below
            failure.append(exc)

    t = threading.Thread(target=work)
    t.start()
    deadline = time.monotonic() + 60
    while pool.stats["units"] == before["units"] and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)  # a Ray worker this test started
    t.join(timeout=300)  # generous: CI machines are slow and shared
    assert not t.is_alive() and not failure, failure
    lost = (pool.stats["resubmitted"] - before["resubmitted"]
            + pool.stats["resealed"] - before["resealed"])
    assert lost >= 1 and pool.pids[0] != victim  # the kill hit work, and Ray restarted it
    assert_same_output(reference, out, JOB[1])


def test_interrupted_run_resumes_finished_units(pool, long_video, reference, tmp_path,
                                                monkeypatch):
    out, ring = tmp_path / "crowd30.anon.mp4", tmp_path / "ring.json"
    joins = []

    def die_at_first_join(*a, **k):
        joins.append(a)
        raise KeyboardInterrupt

    monkeypatch.setattr(scale, "join_parts", die_at_first_join)
    with pytest.raises(KeyboardInterrupt):
        _on_ray(pool, long_video, out, ring, segment=8)
    work = tmp_path / "crowd30.anon.mp4.vidanon-work"
    done = json.loads((work / "manifest.json").read_text())["units"]
    assert len(done) >= 2 and not out.exists()
    entry = json.loads(ring.read_text())["jobs"][JOB[0]]
    assert entry["status"] == "pending" and entry["resume"] == str(work.resolve())
    monkeypatch.undo()
    before = dict(pool.stats)
    monkeypatch.setattr(pipeline, "new_job",
                        lambda: pytest.fail("a resumed run must continue the old job"))
    res = pipeline.run(long_video, out, ring, load_settings(None, OVERRIDES), "tiny-pixel",
                       "cpu", quiet=True, renderer=scale.RayRenderer(pool, 8))
    assert res.job_id == JOB[0]
    assert pool.stats["reused"] - before["reused"] == len(done)
    assert_same_output(reference, out, JOB[1])
    assert not work.exists()


def _clip(src: Path, dst: Path, start: float, frames: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    cut(src, dst, start, frames / 29.97)
    return dst


def test_folder_on_ray_equals_single_machine_and_skips_on_rerun(pool, tmp_path, monkeypatch):
    sample = REPO / "samples" / "crowd.mp4"
    folder = tmp_path / "archive"
    a = _clip(sample, folder / "cam1" / "a.mp4", 1.0, 10)
    b = _clip(sample, folder / "b.mp4", 0.5, 6)
    (folder / "broken.mp4").write_text("not a video")
    outdir, ring = tmp_path / "out", tmp_path / "ring.json"
    monkeypatch.setattr(scale, "WorkerPool", lambda *a, **k: pool)
    monkeypatch.setattr(pool, "shutdown", lambda: None)
    args = ["run", str(folder), "-o", str(outdir), "--keyring", str(ring), *CLI,
            "--ray", "--segment-frames", "4"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output  # the broken file fails, the others do not
    assert "2 anonymized, 0 already done, 1 failed" in r.output and "ray:" in r.output
    listed = json.loads((outdir / "vidanon-manifest.json").read_text())["files"]
    assert sorted(listed) == ["b.mp4", "cam1/a.mp4"]
    keyring = Keyring.open(ring)
    for inp, out in [(a, outdir / "cam1" / "a.anon.mp4"), (b, outdir / "b.anon.mp4")]:
        job = sidecar.read(sidecar.sidecar_path(out))["job_id"]
        master = keyring.master(job)
        JOBS.append((job, master))
        single = tmp_path / "single" / out.name
        single.parent.mkdir(exist_ok=True)
        _single(inp, single, tmp_path / "single" / "ring.json", job=(job, master))
        assert_same_output(single, out, master)
    r = runner.invoke(app, args)
    assert "0 anonymized, 2 already done, 1 failed" in r.output


def test_bare_ray_flag_and_bad_options_are_one_line_errors(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "nope.mp4"), "--ray"])
    assert r.exit_code == 2 and r.output.startswith("vidanon: error: input")
    r = runner.invoke(app, ["run", str(REPO / "samples" / "crowd.mp4"), "-o",
                            str(tmp_path / "o.mp4"), "--workers", "2"])
    assert r.exit_code == 2 and "need --ray" in r.output


def _needles(keys: list[Key]) -> list[bytes]:
    out = []
    for k in keys:
        raw = k.reveal()
        out += [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw),
                base64.urlsafe_b64encode(raw), base64.b64encode(raw).rstrip(b"=")]
    return out


def test_no_key_material_in_ray_logs_task_args_or_results(pool):
    """Runs last: scans what every earlier test's runs left in Ray."""
    assert len(RECORDED) > 20
    keys = []
    for job, master in JOBS:
        keys.append(master)
        for tid in range(64):
            for epoch in (0, 1):
                keys.append(track_key(master, job, tid, epoch))
    needles = _needles(keys)
    # The search finds a key where one is: a pickled Key holds its raw bytes.
    assert any(n in ray.cloudpickle.dumps(keys[1].reveal()) for n in needles)
    for blob in RECORDED:
        assert not any(n in blob for n in needles)
    logs = Path("/tmp/ray/session_latest/logs")
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles), path
