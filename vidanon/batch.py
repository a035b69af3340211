"""Folders of videos (CCTV exports): recursive, resumable, one bad file never stops the rest.

A file counts as done when its output and sidecar both exist and the sidecar names the same
input hash; outputs are published with their sidecars all-or-nothing, so an interrupted file
is simply redone on the next run.  Inputs that would share an output name (``clip.mp4`` and
``clip.mov``) get names that keep their extension (``clip.mp4.anon.mp4``, ``clip.mov.anon.mp4``)
instead of overwriting each other.  An existing output that is not this input's is never
replaced without ``force``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vidanon import sidecar
from vidanon.errors import VidanonError

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".m4v", ".webm", ".ts", ".mts")


@dataclass
class BatchSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def line(self) -> str:
        return (f"{len(self.done)} anonymized, {len(self.skipped)} already done, "
                f"{len(self.failed)} failed")


def find_videos(folder: Path, exts: tuple[str, ...] = VIDEO_EXTS) -> list[Path]:
    return sorted(
        p for p in Path(folder).rglob("*")
        if p.is_file() and p.suffix.lower() in exts and ".anon." not in p.name
        and ".recovered." not in p.name and ".partial-" not in p.name
    )


def output_for(inp: Path, folder: Path, out_dir: Path) -> Path:
    rel = inp.relative_to(folder)
    return (out_dir / rel).with_name(rel.stem + ".anon.mp4")


def plan_outputs(videos: list[Path], folder: Path, out_dir: Path) -> dict[Path, Path]:
    """Output per input; inputs whose default outputs collide keep their extension."""
    default = {inp: output_for(inp, folder, out_dir) for inp in videos}
    count: dict[Path, int] = {}
    for out in default.values():
        count[out] = count.get(out, 0) + 1
    plan = {}
    for inp, out in default.items():
        if count[out] > 1:
            out = out.with_name(inp.name + ".anon.mp4")
        plan[inp] = out
    taken: dict[Path, Path] = {}
    for inp, out in plan.items():  # clip.mp4 next to a video literally named clip.mp4.mp4
        if out in taken:
            raise VidanonError(f"{inp} and {taken[out]} would both be written to {out}; "
                               "rename one of them")
        taken[out] = inp
    return plan


def is_done(inp: Path, out: Path) -> bool:
    side = sidecar.sidecar_path(out)
    if not (out.exists() and side.exists()):
        return False
    try:
        doc = json.loads(side.read_text())
        return doc["input"]["sha256"] == sidecar.file_sha256(inp)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_folder(folder: Path, out_dir: Path | None, process: Callable[[Path, Path], object],
               quiet: bool = False, force: bool = False, parallel: int = 1,
               manifest: bool = False, stop: Callable[[], None] | None = None,
               on_file: Callable[[Path, str], None] | None = None) -> BatchSummary:
    """Anonymize every video under ``folder``; failures are reported (stderr) and skipped.

    ``parallel`` > 1 processes that many files at once, in threads (a Ray run: the driver
    plans one file while the cluster renders others).  ``manifest`` records finished files
    in ``<out_dir>/vidanon-manifest.json`` and trusts it on re-runs (``units.FileManifest``).
    ``stop`` is called if the run is interrupted, to make the threads give up their files;
    ``on_file(input, "done" | "skipped" | "failed")`` as each file is settled.
    """
    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir else folder.with_name(folder.name + "_anon")
    if out_dir.exists() and not out_dir.is_dir():
        raise VidanonError(f"output {out_dir} is a file; a folder run needs an output folder")
    videos = find_videos(folder)
    if not videos:
        raise VidanonError(f"no video files under {folder}")
    plan = plan_outputs(videos, folder, out_dir)
    files = None
    if manifest:
        from vidanon.units import FileManifest

        files = FileManifest(out_dir)

    def one(inp: Path) -> tuple[str, str]:
        outcome = settle(inp)
        if on_file is not None:
            on_file(inp, outcome[0])
        return outcome

    def settle(inp: Path) -> tuple[str, str]:
        out = plan[inp]
        key = inp.relative_to(folder).as_posix()
        if (files is not None and files.done(key, inp, out)) or is_done(inp, out):
            return "skipped", ""
        try:
            if out.exists() and not force:
                raise VidanonError(f"{out} already exists and is not this file's output; "
                                   "pass --force to replace it")
            out.parent.mkdir(parents=True, exist_ok=True)
            process(inp, out)
            if files is not None:
                files.add(key, inp, out)
            return "done", ""
        except VidanonError as exc:
            if is_done(inp, out):  # another run over the same folder did it meanwhile
                return "skipped", ""
            tqdm.write(f"failed: {inp}: {exc}", file=sys.stderr)
            return "failed", str(exc)
        except OSError as exc:
            tqdm.write(f"failed: {inp}: {exc.strerror or exc}", file=sys.stderr)
            return "failed", str(exc)

    outcomes: dict[Path, tuple[str, str]] = {}
    bar = tqdm(total=len(videos), desc="files", unit="file", disable=quiet, position=0)
    if parallel <= 1:
        for inp in videos:
            outcomes[inp] = one(inp)
            bar.update()
    else:
        with ThreadPoolExecutor(parallel, thread_name_prefix="vidanon-file") as pool:
            futures = {pool.submit(one, inp): inp for inp in videos}
            try:
                for fut in as_completed(futures):
                    outcomes[futures[fut]] = fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                if stop is not None:
                    stop()
                raise
    bar.close()
    summary = BatchSummary()
    for inp in videos:  # input order, however the files finished
        what, why = outcomes[inp]
        if what == "done":
            summary.done.append(inp)
        elif what == "skipped":
            summary.skipped.append(inp)
        else:
            summary.failed.append((inp, why))
    return summary
