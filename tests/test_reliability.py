"""Issue #13, reliability: no lost keys, no silent overwrites, one-line errors.

Kept cheap: a 5-frame cut of the shipped sample, the tiny random pixel model, keyrings with a
low scrypt cost, and most bad inputs refused before any model is loaded.  "Kills" are
simulated in forked children that ``os._exit`` at a chosen step (no cleanup runs, as with
SIGKILL).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vidanon import passes, pipeline, publish, sidecar
from vidanon.cli import app
from vidanon.errors import KeyMaterialError, MediaError, VidanonError
from vidanon.keys import Key, Keyring, export_track_key, read_track_key
from vidanon.media import cut

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-pixel", "--set", "diffusion.steps=2", "--set", "diffusion.refine=0",
        "--set", "encode.lossless=true", "--quiet"]
LOW_N = 2**10  # scrypt cost for test keyrings (real ones: 2**15)
runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip5") / "crowd5.mp4"
    cut(REPO / "samples" / "crowd.mp4", out, 1.0, 5 / 29.97)
    return out


@pytest.fixture(scope="module")
def done(clip, tmp_path_factory):
    """One successful run: (output, keyring)."""
    d = tmp_path_factory.mktemp("done")
    out, ring = d / "crowd5.anon.mp4", d / "ring.json"
    r = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST])
    assert r.exit_code == 0, r.output
    return out, ring


def _jobs(ring: Path, passphrase: str | None = None) -> dict:
    return Keyring.open(ring, passphrase).jobs if ring.exists() else {}


def _fork(target, *args) -> int:
    """Run ``target`` in a forked child; its exit code (a "kill" is an ``os._exit``)."""
    proc = mp.get_context("fork").Process(target=_single_threaded, args=(target, *args))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
    return proc.exitcode


def _single_threaded(target, *args) -> None:
    """Thread pools do not survive fork: the child's torch uses none.  (OpenCV's pool works
    in the child, but ``cv2.setNumThreads`` there would hang.)"""
    import torch

    torch.set_num_threads(1)
    target(*args)


# --- 1. concurrent writers lose no jobs ------------------------------------------------------


def test_stale_keyring_copy_does_not_overwrite_newer_jobs(tmp_path):
    path = tmp_path / "ring.json"
    a = Keyring.open(path, create=True)
    b = Keyring.open(path, create=True)  # both read the same (empty) state
    a.add_job("a" * 16, Key.generate())
    a.save()
    b.add_job("b" * 16, Key.generate())
    b.save()
    assert set(_jobs(path)) == {"a" * 16, "b" * 16}
    b.remove_job("b" * 16)
    b.save()
    assert set(_jobs(path)) == {"a" * 16}


def _add_jobs(path: str, passphrase: str | None, worker: int, n: int) -> None:
    for i in range(n):
        ring = Keyring.open(Path(path), passphrase, create=True, kdf_n=LOW_N)
        ring.add_job(f"{worker:02d}{i:014d}", Key.generate())
        ring.save()


@pytest.mark.parametrize("passphrase", [None, "correct horse"])
def test_four_processes_lose_no_jobs(tmp_path, passphrase):
    path = tmp_path / "ring.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_add_jobs, args=(str(path), passphrase, w, 25))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(_jobs(path, passphrase)) == 100  # 4 x 25, none lost


# --- 2. a new encrypted keyring asks twice ---------------------------------------------------


def test_new_encrypted_keyring_passphrase_is_confirmed(clip, tmp_path):
    ring = tmp_path / "new.json"
    args = ["run", str(clip), "-o", str(tmp_path / "o.mp4"), "--keyring", str(ring),
            "--passphrase", *FAST]
    r = runner.invoke(app, args, input="secret\ntypo\n", env={"VIDANON_PASSPHRASE": ""})
    assert "Repeat for confirmation" in r.output and "do not match" in r.output
    assert r.exit_code != 0 and not ring.exists() and not (tmp_path / "o.mp4").exists()


def test_existing_encrypted_keyring_passphrase_is_asked_once(monkeypatch, tmp_path):
    from vidanon import cli

    ring = tmp_path / "ring.json"
    k = Keyring.open(ring, "pw", create=True, kdf_n=LOW_N)
    k.add_job("c" * 16, Key.generate())
    k.save()
    asked = []
    monkeypatch.delenv("VIDANON_PASSPHRASE", raising=False)
    monkeypatch.setattr(cli.typer, "prompt", lambda text, **kw: asked.append(kw) or "pw")
    assert cli._passphrase(True, ring) == "pw"
    assert cli._passphrase(True, tmp_path / "other.json") == "pw"
    assert [kw["confirmation_prompt"] for kw in asked] == [False, True]


# --- 3. outputs never collide ------------------------------------------------------------------


def test_folder_inputs_with_one_stem_get_distinct_outputs(clip, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(clip.read_bytes())
    (folder / "clip.mov").write_bytes(clip.read_bytes())
    outdir, ring = tmp_path / "out", tmp_path / "k.json"
    args = ["run", str(folder), "-o", str(outdir), "--keyring", str(ring), *FAST]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "2 anonymized, 0 already done, 0 failed" in r.stdout
    outs = sorted(p.name for p in outdir.glob("*.anon.mp4"))
    assert outs == ["clip.mov.anon.mp4", "clip.mp4.anon.mp4"]
    jobs = {sidecar.read(sidecar.sidecar_path(outdir / n))["job_id"] for n in outs}
    assert jobs == set(_jobs(ring))  # each output has its own job, no orphan
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "0 anonymized, 2 already done, 0 failed" in r.stdout


def test_second_input_onto_the_same_default_output_is_refused(clip, tmp_path):
    a, b = tmp_path / "still.mp4", tmp_path / "still.mov"
    a.write_bytes(clip.read_bytes())
    b.write_bytes(clip.read_bytes())
    ring = tmp_path / "k.json"
    assert runner.invoke(app, ["run", str(a), "--keyring", str(ring), *FAST]).exit_code == 0
    out = tmp_path / "still.anon.mp4"
    before = out.read_bytes()
    r = runner.invoke(app, ["run", str(b), "--keyring", str(ring), *FAST])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert out.read_bytes() == before and len(_jobs(ring)) == 1


# --- 4. zero faces where faces are must not look like success -------------------------------


def test_detection_settings_that_find_nothing_fail(clip, tmp_path):
    out, ring = tmp_path / "o.mp4", tmp_path / "k.json"
    r = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring),
                            "--set", "detect.score_threshold=0.9999", *FAST])
    assert r.exit_code == 2, r.output
    assert "default detector finds faces" in r.stderr
    assert not out.exists() and _jobs(ring) == {}


# --- 5. video and sidecar replaced together or not at all -------------------------------------


def _pair(folder: Path, tag: str) -> tuple[Path, Path]:
    v = folder / f"{tag}.video.tmp"
    v.write_bytes(f"video {tag}".encode() * 100)
    s = folder / f"{tag}.side.tmp"
    s.write_text(json.dumps({"output": {"sha256": sidecar.file_sha256(v)}, "tag": tag}))
    return v, s


def _publish_and_die(tmp_v: str, tmp_s: str, out: str, die_at: int) -> None:
    calls = {"n": 0}
    real = os.replace

    def replace(src, dst):  # 1: marker, 2: video, 3: sidecar
        calls["n"] += 1
        if calls["n"] == die_at:
            os._exit(9)
        return real(src, dst)

    publish.os.replace = replace
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if die_at == 99 and self.name.endswith(publish.TXN):
            os._exit(9)
        return real_unlink(self, missing_ok=missing_ok)

    Path.unlink = unlink
    publish.publish(Path(tmp_v), Path(tmp_s), Path(out), overwrite=True)


@pytest.mark.parametrize("die_at,expect", [(2, "old"), (3, "old"), (99, "new")])
def test_kill_while_replacing_leaves_one_whole_pair(tmp_path, die_at, expect):
    out = tmp_path / "a.anon.mp4"
    old_v, old_s = _pair(tmp_path, "old")
    publish.publish(old_v, old_s, out, overwrite=False)
    new_v, new_s = _pair(tmp_path, "new")
    assert _fork(_publish_and_die, str(new_v), str(new_s), str(out), die_at) == 9
    publish.repair(out)  # what the next run (or a re-run) does first
    doc = json.loads(sidecar.sidecar_path(out).read_text())
    assert doc["tag"] == expect
    assert doc["output"]["sha256"] == sidecar.file_sha256(out)
    assert sorted(p.name for p in tmp_path.iterdir() if "vidanon-" in p.name) == []


def test_publish_refuses_existing_output_without_overwrite(tmp_path):
    out = tmp_path / "a.anon.mp4"
    out.write_bytes(b"precious")
    v, s = _pair(tmp_path, "new")
    with pytest.raises(VidanonError, match="--force"):
        publish.publish(v, s, out, overwrite=False)
    assert out.read_bytes() == b"precious" and not sidecar.sidecar_path(out).exists()


# --- 6. symlinked keyring ---------------------------------------------------------------------


def test_symlinked_keyring_is_written_through(tmp_path):
    vault = tmp_path / "vault"
    vault.mkdir()
    real = vault / "ring.json"
    Keyring.open(real, create=True).save()
    link = tmp_path / "ring.json"
    link.symlink_to(real)
    ring = Keyring.open(link)
    ring.add_job("d" * 16, Key.generate())
    ring.save()
    assert link.is_symlink() and "d" * 16 in _jobs(real)


# --- 7. exported keys have their own passphrase (or none) ------------------------------------


def test_export_from_encrypted_keyring_is_not_sealed_with_its_passphrase(tmp_path):
    path = tmp_path / "ring.json"
    ring = Keyring.open(path, "owner-secret", create=True, kdf_n=LOW_N)
    master = Key.generate()
    ring.add_job("e" * 16, master)
    ring.save()
    plain = tmp_path / "plain.key"
    r = runner.invoke(app, ["keys", "export", str(path), "--track", "1", "-o", str(plain)],
                      env={"VIDANON_PASSPHRASE": "owner-secret", "VIDANON_KEY_PASSPHRASE": ""})
    assert r.exit_code == 0, r.output
    assert read_track_key(plain)[2].id in r.stdout  # no passphrase needed to read it
    sealed = tmp_path / "sealed.key"
    r = runner.invoke(app, ["keys", "export", str(path), "--track", "1", "-o", str(sealed)],
                      env={"VIDANON_PASSPHRASE": "owner-secret",
                           "VIDANON_KEY_PASSPHRASE": "for-investigator"})
    assert r.exit_code == 0, r.output
    with pytest.raises(KeyMaterialError, match="key file is encrypted"):
        read_track_key(sealed)
    with pytest.raises(KeyMaterialError, match="wrong passphrase"):
        read_track_key(sealed, "owner-secret")
    assert read_track_key(sealed, "for-investigator")[2] == read_track_key(plain)[2]


# --- 8. no master key in a repr ---------------------------------------------------------------


def test_keyring_repr_hides_master_keys(tmp_path):
    ring = Keyring.open(tmp_path / "r.json", "pw", create=True)
    master = Key.generate()
    ring.add_job("f" * 16, master)
    for text in (repr(ring), str(ring), f"{ring!r}"):
        assert master.hex() not in text and "pw" not in text.replace("path", "")


# --- 9. no silent overwrites -----------------------------------------------------------------


def test_run_onto_existing_file_needs_force(clip, tmp_path):
    out, ring = tmp_path / "mine.mp4", tmp_path / "k.json"
    out.write_bytes(b"do not touch")
    r = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert out.read_bytes() == b"do not touch" and not ring.exists()
    r = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring),
                            "--force", *FAST])
    assert r.exit_code == 0, r.output
    doc = sidecar.read(sidecar.sidecar_path(out))
    assert doc["output"]["sha256"] == sidecar.file_sha256(out) and len(_jobs(ring)) == 1


def test_key_export_onto_existing_file_needs_force(done, tmp_path):
    out, ring = done
    dest = tmp_path / "t1.key"
    dest.write_text("old")
    args = ["keys", "export", str(ring), "--track", "1", "-o", str(dest)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.stderr and dest.read_text() == "old"
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0 and read_track_key(dest)[1] == 1


def test_recover_onto_existing_file_needs_force(done, tmp_path):
    out, ring = done
    dest = tmp_path / "rec.mp4"
    dest.write_bytes(b"old")
    r = runner.invoke(app, ["recover", str(out), "--track", "1", "--keyring", str(ring),
                            "-o", str(dest), "--model", "tiny-pixel", "--quiet"])
    assert r.exit_code == 2 and "--force" in r.stderr and dest.read_bytes() == b"old"


# --- 10/13. the bad-input suite: one line, non-zero, nothing written --------------------------


def _bad(case: str, clip: Path, tmp: Path) -> tuple[list[str], Path, Path]:
    """(argv, output that must not appear, keyring that must stay without jobs)."""
    out, ring = tmp / "o.anon.mp4", tmp / "k.json"
    extra: list[str] = []
    if case.startswith("set:"):
        extra = ["--set", case[4:]]
    elif case == "yaml-corrupt":
        (tmp / "c.yaml").write_text("diffusion: {steps: 4\n  refine: [\n")
        extra = ["--config", str(tmp / "c.yaml")]
    elif case == "yaml-list":
        (tmp / "c.yaml").write_text("- steps: 4\n- refine: 2\n")
        extra = ["--config", str(tmp / "c.yaml")]
    elif case == "device-tpu":
        extra = ["--device", "tpu"]
    elif case == "keyring-under-file":
        (tmp / "afile").write_text("x")
        ring = tmp / "afile" / "k.json"
    elif case == "keyring-unwritable":
        (tmp / "ro").mkdir()
        os.chmod(tmp / "ro", 0o555)
        ring = tmp / "ro" / "k.json"
    elif case == "output-is-folder":
        out = tmp / "outdir"
        out.mkdir()
    elif case == "output-folder-missing":
        out = tmp / "nope" / "o.mp4"
    elif case == "zero-faces":
        extra = ["--set", "detect.scale=0.05"]
    args = ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST, *extra]
    return args, out, ring


BAD = ["set:diffusion.steps=abc", "set:diffusion.steps=0", "set:diffusion.steps=-3",
       "set:diffusion.batch_size=0", "set:diffusion.strength=5", "set:encode.crf=high",
       "set:detect.score_threshold=2", "set:encode.preset=fastest", "set:diffusion.stepz=3",
       "set:diffusion.steps=[", "yaml-corrupt", "yaml-list", "device-tpu",
       "keyring-under-file", "keyring-unwritable", "output-is-folder",
       "output-folder-missing", "zero-faces"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_no_output_no_key(case, clip, tmp_path, monkeypatch):
    if case == "keyring-unwritable" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    if case in ("output-is-folder", "output-folder-missing") or case.startswith("set:"):
        # Refused up front: detection (let alone rendering) must never start.
        monkeypatch.setattr(pipeline, "detect_and_track", lambda *a, **k: pytest.fail("ran"))
    args, out, ring = _bad(case, clip, tmp_path)
    r = runner.invoke(app, args)
    assert r.exit_code not in (0, None), r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3 and lines[0].startswith("vidanon: error:"), r.stderr
    assert not out.is_file() and not sidecar.sidecar_path(out).exists()
    assert _jobs(ring) == {}
    assert [p.name for p in tmp_path.rglob("*.partial-*")] == []


def test_folder_failures_go_to_stderr(clip, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.mp4").write_text("garbage")
    r = runner.invoke(app, ["run", str(folder), "-o", str(tmp_path / "out"), "--keyring",
                            str(tmp_path / "k.json"), *FAST])
    assert r.exit_code == 1
    assert "failed: " in r.stderr and "failed: " not in r.stdout
    assert "0 anonymized, 0 already done, 1 failed" in r.stdout
    assert _jobs(tmp_path / "k.json") == {}


@pytest.mark.parametrize("cmd", [["run"], ["recover"], ["keys", "export"], ["keys", "list"]])
def test_help_has_no_placeholder_markup(cmd):
    r = runner.invoke(app, [*cmd, "--help"], terminal_width=120)
    assert r.exit_code == 0
    assert "<bool>" not in r.output and "{" not in r.output, r.output


# --- 11. failed runs leave no keyring entry; kills leave only an incomplete one ----------------


def test_failure_while_rendering_removes_pending_job_and_temp_files(clip, tmp_path,
                                                                    monkeypatch):
    def boom(*a, **k):
        raise MediaError("disk full (simulated)")

    monkeypatch.setattr(passes, "render_video", boom)
    out, ring = tmp_path / "o.mp4", tmp_path / "k.json"
    r = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST])
    assert r.exit_code == 2 and "disk full" in r.stderr
    assert _jobs(ring) == {} and sorted(p.name for p in tmp_path.iterdir()) == ["k.json",
                                                                                "k.json.lock"]


def _run_and_die(clip: str, out: str, ring: str, where: str) -> None:
    def die(*a, **k):
        os._exit(9)

    if where == "render":
        passes.render_video = die
    else:  # after publishing, before the job is marked complete
        Keyring.update_job = die
    from vidanon.config import load_settings

    # The oval mask: MediaPipe's graphs do not start in a child forked from a parent that
    # ran them (earlier tests), and face tracing is beside the point here.
    pipeline.run(Path(clip), Path(out), Path(ring),
                 load_settings(None, ["diffusion.steps=2", "diffusion.refine=0",
                                      "faces.mask=oval"]),
                 "tiny-pixel", "cpu", True)


def test_kill_during_render_leaves_only_an_incomplete_job_that_is_not_exported(clip, tmp_path):
    out, ring = tmp_path / "o.anon.mp4", tmp_path / "k.json"
    assert _fork(_run_and_die, str(clip), str(out), str(ring), "render") == 9
    (job, entry), = _jobs(ring).items()
    assert entry["status"] == "pending" and not out.exists()
    assert list(tmp_path.glob("o.anon.partial-*"))  # what SIGKILL leaves
    r = runner.invoke(app, ["keys", "list", str(ring)])
    assert r.exit_code == 0 and "INCOMPLETE" in r.stdout and entry["master"] not in r.stdout
    r = runner.invoke(app, ["keys", "export", str(ring), "--track", "1", "-o",
                            str(tmp_path / "t.key")])
    assert r.exit_code == 2 and not (tmp_path / "t.key").exists()
    r = runner.invoke(app, ["keys", "export", str(ring), "--job", job, "--track", "1", "-o",
                            str(tmp_path / "t.key")])
    assert r.exit_code == 2 and "incomplete" in r.stderr
    # The next run to that output cleans the dead run's files and its pending job.
    r = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST])
    assert r.exit_code == 0, r.output
    assert list(tmp_path.glob("o.anon.partial-*")) == []
    jobs = _jobs(ring)
    assert job not in jobs and [e["status"] for e in jobs.values()] == ["complete"]


def test_kill_after_publishing_keeps_the_job_recoverable(clip, tmp_path):
    out, ring = tmp_path / "o.anon.mp4", tmp_path / "k.json"
    assert _fork(_run_and_die, str(clip), str(out), str(ring), "complete") == 9
    (job, entry), = _jobs(ring).items()
    assert entry["status"] == "pending" and out.exists()
    side = sidecar.sidecar_path(out)
    r = runner.invoke(app, ["keys", "export", str(ring), "--sidecar", str(side), "--track", "1",
                            "-o", str(tmp_path / "t.key")])
    assert r.exit_code == 0, r.output
    doc = sidecar.read(side)
    assert read_track_key(tmp_path / "t.key")[2].id == sidecar.track_entry(doc, 1)["key_id"]
    # A later run over another output marks it complete rather than dropping it.
    r = runner.invoke(app, ["run", str(clip), "-o", str(tmp_path / "b.mp4"), "--keyring",
                            str(ring), *FAST])
    assert r.exit_code == 0, r.output
    assert _jobs(ring)[job]["status"] == "complete"


def test_export_refuses_unknown_track(done, tmp_path):
    out, ring = done
    n = len(sidecar.read(sidecar.sidecar_path(out))["tracks"])
    r = runner.invoke(app, ["keys", "export", str(ring), "--track", "99", "-o",
                            str(tmp_path / "t.key")])
    assert r.exit_code == 2 and "no track 99" in r.stderr and f"{n}" in r.stderr
    assert not (tmp_path / "t.key").exists()
    with pytest.raises(KeyMaterialError, match="no track 99"):
        ring_obj = Keyring.open(ring)
        export_track_key(ring_obj, next(iter(ring_obj.jobs)), 99, tmp_path / "u.key")


# --- 12. interrupted runs leave no partial files ----------------------------------------------


def test_sigterm_during_render_cleans_up(clip, tmp_path, monkeypatch):
    def term(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        pytest.fail("SIGTERM did not interrupt the run")

    monkeypatch.setattr(passes, "render_video", term)
    out, ring = tmp_path / "o.mp4", tmp_path / "k.json"
    before = signal.getsignal(signal.SIGTERM)
    r = runner.invoke(app, ["run", str(clip), "-o", str(out), "--keyring", str(ring), *FAST])
    assert r.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in tmp_path.glob("*partial*")] == [] and _jobs(ring) == {}
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored


def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "x.anon.mp4"
    dead = tmp_path / "x.anon.partial-999999999-abc.mp4"
    legacy = tmp_path / "x.anon.partial-k3j4.mp4"
    live = tmp_path / f"x.anon.partial-{os.getppid()}-abc.mp4"
    other = tmp_path / "y.anon.partial-999999999-abc.mp4"
    for p in (dead, legacy, live, other):
        p.write_bytes(b"")
    publish.clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_keyring_file_is_private(tmp_path):
    ring = Keyring.open(tmp_path / "k.json", create=True)
    ring.add_job("0" * 16, Key.generate())
    ring.save()
    assert stat.S_IMODE(os.stat(tmp_path / "k.json").st_mode) == 0o600
