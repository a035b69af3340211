"""Folders of videos (CCTV exports): recursive, resumable, one bad file never stops the rest.

A file counts as done when its output and sidecar both exist and the sidecar names the same
input hash; outputs are written by temp file + rename, so an interrupted file is simply
redone on the next run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
               quiet: bool = False) -> BatchSummary:
    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir else folder.with_name(folder.name + "_anon")
    videos = find_videos(folder)
    if not videos:
        raise VidanonError(f"no video files under {folder}")
    summary = BatchSummary()
    for inp in tqdm(videos, desc="files", unit="file", disable=quiet, position=0):
        out = output_for(inp, folder, out_dir)
        if is_done(inp, out):
            summary.skipped.append(inp)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            process(inp, out)
            summary.done.append(inp)
        except VidanonError as exc:
            summary.failed.append((inp, str(exc)))
            tqdm.write(f"failed: {inp}: {exc}")
    return summary
