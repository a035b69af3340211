"""Sharded, atomic training checkpoints.

A checkpoint is a folder ``ckpt/step_XXXXXXXX/`` holding ``state.json`` and the tensors in
safetensors shards of at most 16 MB each, and ``ckpt/latest`` names the newest one.  Why:

* shards, because files coming back from a GPU lease are limited to 16 MiB each (and a
  checkpoint must stay under 60 MB in all so it can travel with the data);
* atomic (write into a temporary folder, then ``os.replace``), because training is stopped by
  time limits and kills, and a half-written checkpoint must never be the one resumed from;
* safetensors rather than pickle, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD_BYTES = 16_000_000  # per file: under the 16 MiB a GPU lease returns per file
CKPT_BYTES = 60_000_000  # per checkpoint, all files together
LATEST = "latest"
_HEADER_BASE = 1024  # safetensors header: metadata, braces, alignment padding
_HEADER_PER_TENSOR = 128  # '"key":{"dtype":"F32","shape":[...],"data_offsets":[a,b]},'



def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard_tensors(
    tensors: dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES
) -> list[dict[str, torch.Tensor]]:
    """Greedily pack tensors (in key order) into files of at most ``shard_bytes``.

    Counts the safetensors JSON header too (an entry per tensor plus a small fixed part), so
    the limit holds for the file size, not just the tensor data.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = _HEADER_BASE
    for key in sorted(tensors):
        t = tensors[key]
        n = _nbytes(t) + len(key) + _HEADER_PER_TENSOR
        if n + _HEADER_BASE > shard_bytes:
            raise ValueError(f"tensor {key} ({n} bytes) is larger than a shard ({shard_bytes})")
        if size + n > shard_bytes and shards[-1]:
            shards.append({})
            size = _HEADER_BASE
        shards[-1][key] = t
        size += n
    return shards


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file so readers see either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    shard_bytes: int = SHARD_BYTES,
    keep: int = 2,
) -> Path:
    """Write ``root/step_XXXXXXXX`` atomically, point ``root/latest`` at it, prune old ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    shards = shard_tensors(cpu, shard_bytes)
    files = []
    for i, shard in enumerate(shards):
        f = tmp / f"tensors-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(f), metadata={"step": str(step)})
        files.append(f)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    files.append(tmp / "state.json")
    for f in files:
        _fsync(f)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, name + "\n")
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from itself, a ``ckpt/`` root or a run folder (newest wins)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path, path / "ckpt"):
        latest = root / LATEST
        if latest.is_file():
            cand = root / latest.read_text().strip()
            if (cand / "state.json").is_file():
                return cand
        steps = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
        if steps:
            return steps[-1]
    raise FileNotFoundError(f"no checkpoint under {path}")


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of the checkpoint that ``path`` resolves to."""
    ckpt = resolve_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("tensors-*.safetensors")):
        tensors.update(load_file(str(f)))
    meta = json.loads((ckpt / "state.json").read_text())
    meta["_path"] = str(ckpt)
    return tensors, meta


def checkpoint_bytes(path: Path) -> tuple[int, int]:
    """(total bytes, largest file bytes) of a checkpoint folder."""
    sizes = [f.stat().st_size for f in Path(path).iterdir() if f.is_file()]
    return sum(sizes), max(sizes)
