"""Putting an output video and its sidecar in place together, or not at all.

A video is only recoverable with the sidecar that describes it, and two renames cannot be
one atomic step.  So publishing is a small journalled transaction, per output path:

1. the new video and sidecar are complete under temporary names (``<stem>.partial-<pid>-*``);
2. any existing video/sidecar get a second name (hard link) ``<name>.vidanon-prev``;
3. a marker ``<video>.vidanon-txn`` records which of them existed (written atomically);
4. both new files are renamed over the old ones;
5. the marker is removed (the commit point), then the backups.

``repair`` (run before every publish to the same path, and by ``vidanon run`` before it
starts) finishes an interrupted transaction: with a marker present and the pair at the final
names not matching (sidecar hash != video hash) it restores the backups, so a kill at any
instant leaves either the old recoverable pair or the new one.  Temporary files carry the
writer's process id, so a later run removes those of dead writers only.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vidanon import sidecar
from vidanon.errors import VidanonError
from vidanon.keys import pid_alive

PREV = ".vidanon-prev"
TXN = ".vidanon-txn"


def partial_prefix(out: Path) -> str:
    """Temporary names for ``out``: ``<stem>.partial-<pid>-``; the pid lets others clean up."""
    return f"{Path(out).stem}.partial-{os.getpid()}-"


def temp_path(out: Path, suffix: str) -> Path:
    """A fresh, empty temporary file next to ``out`` (same filesystem: renames are atomic)."""
    out = Path(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix(out), suffix=suffix, dir=out.parent)
    except OSError as exc:
        raise VidanonError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    return Path(tmp)


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary files for ``out`` left by writers that no longer run (kill -9)."""
    out = Path(out)
    removed = []
    pattern = glob.escape(str(out.parent / f"{out.stem}.partial-")) + "*"
    for name in glob.glob(pattern):
        rest = Path(name).name[len(out.stem) + len(".partial-"):]
        pid_text = rest.split("-", 1)[0]
        if not pid_text.isdigit():  # an older name without pid: nobody can be writing it
            alive = False
        else:
            alive = int(pid_text) != os.getpid() and pid_alive(int(pid_text))
        if not alive:
            with contextlib.suppress(OSError):
                Path(name).unlink()
                removed.append(Path(name))
    return removed


def write_temp_sidecar(out: Path, doc: dict) -> Path:
    """The signed sidecar under a temporary name beside ``out``, readable by all (no secret)."""
    tmp = temp_path(out, ".json")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Serialise publishers of one output path (a lock in the temp dir, not the output folder,
    which gets published)."""
    digest = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:24]
    lock = Path(tempfile.gettempdir()) / f"vidanon-out-{digest}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pair_matches(video: Path, side: Path) -> bool:
    try:
        doc = json.loads(side.read_text())
        return doc["output"]["sha256"] == sidecar.file_sha256(video)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _names(out: Path) -> tuple[Path, Path, Path, Path, Path]:
    side = sidecar.sidecar_path(out)
    return (out, side, out.with_name(out.name + PREV), side.with_name(side.name + PREV),
            out.with_name(out.name + TXN))


def _repair(out: Path) -> str | None:
    video, side, vprev, sprev, marker = _names(out)
    outcome = None
    if marker.exists():
        try:
            had = json.loads(marker.read_text())
        except (OSError, ValueError):
            had = {}
        if not (video.exists() and side.exists() and _pair_matches(video, side)):
            for final, prev, key in ((video, vprev, "video"), (side, sprev, "sidecar")):
                if had.get(key) and prev.exists():
                    os.replace(prev, final)
                elif not had.get(key):
                    final.unlink(missing_ok=True)
            outcome = "rolled back"
        else:
            outcome = "completed"
        marker.unlink(missing_ok=True)
        _fsync_dir(out.parent)
    for prev in (vprev, sprev):
        prev.unlink(missing_ok=True)
    return outcome


def repair(out: Path) -> str | None:
    """Finish an interrupted publish of ``out``: "rolled back", "completed" or None."""
    out = Path(out)
    if not out.parent.is_dir():
        return None
    with _output_lock(out):
        return _repair(out)


def _backup(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links: a copy is slower but as safe
        shutil.copy2(src, dst)


def publish(tmp_video: Path, tmp_side: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp pair to ``out`` and its sidecar, all-or-nothing (see top)."""
    out = Path(out)
    video, side, vprev, sprev, marker = _names(out)
    with _output_lock(out):
        _repair(out)
        exists = {"video": video.exists(), "sidecar": side.exists()}
        if exists["video"] and not overwrite:
            raise VidanonError(f"{video} already exists (written meanwhile?); "
                               "pass --force to replace it")
        try:
            if exists["video"]:
                _backup(video, vprev)
            if exists["sidecar"]:
                _backup(side, sprev)
            mtmp = temp_path(out, ".txn")
            mtmp.write_text(json.dumps(exists))
            os.replace(mtmp, marker)
            _fsync_dir(out.parent)
            os.replace(tmp_video, video)
            os.replace(tmp_side, side)
            _fsync_dir(out.parent)
            marker.unlink()
        except OSError as exc:
            _repair(out)
            raise VidanonError(f"cannot write {out}: {exc.strerror or exc}") from None
        except BaseException:
            _repair(out)
            raise
        for prev in (vprev, sprev):
            prev.unlink(missing_ok=True)
        _fsync_dir(out.parent)


def default_output(inp: Path) -> Path:
    return inp.with_name(inp.stem + ".anon.mp4")


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


def published(job_id: str, entry: dict) -> bool:
    """Did a dead run's output make it out (killed after publishing, before marking done)?"""
    path = entry.get("output_path")
    if not path:
        return False
    try:
        return sidecar.read(sidecar.sidecar_path(Path(path)))["job_id"] == job_id
    except VidanonError:
        return False


