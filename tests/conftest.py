"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_VIDEO = REPO / "samples" / "crowd.mp4"


# ---------------------------------------------------------------------------------------------
# media fixtures


def synthetic_image(index: int, width: int, height: int) -> np.ndarray:
    """Smooth moving pattern (BGR uint8): varies per frame, yet codec-friendly so PSNR is stable."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    b = 128 + 70 * np.sin(x / 20.0 + index / 3.0)
    g = 128 + 70 * np.cos(y / 16.0 - index / 4.0)
    r = 128 + 70 * np.sin((x + y) / 30.0 + index / 5.0)
    cx, cy = (index * 3) % width, height / 2
    disc = np.clip(12.0 - np.hypot(x - cx, y - cy), 0.0, 6.0) * 10.0
    image = np.stack([b, g + disc, r - disc], axis=-1)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write_audio(container: av.container.OutputContainer, codec: str, seconds: float) -> None:
    stream = container.streams.audio[0]
    rate = 16000
    chunk = 1024
    fmt = "s16" if codec == "pcm_s16le" else "fltp"
    total = int(rate * seconds)
    for start in range(0, total, chunk):
        t = np.arange(start, min(start + chunk, total)) / rate
        wave = 0.3 * np.sin(2 * np.pi * 440 * t)
        data = (wave * 32767).astype(np.int16) if fmt == "s16" else wave.astype(np.float32)
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format=fmt, layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def _make_video(
    path: Path,
    *,
    size: tuple[int, int] = (64, 48),
    frames: int = 15,
    fps: int = 15,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    audio: str | None = None,
    rotation: int = 0,
    faststart: bool = False,
    codec: str = "libx264",
) -> Path:
    """Write a small synthetic video with PyAV; ``pts`` (in ``time_base``) makes it VFR."""
    width, height = size
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        enc_opts = {"preset": "ultrafast", "crf": "10"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=enc_opts)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if (width % 2 or height % 2) else "yuv420p"
        tb = time_base or Fraction(1, fps)
        stream.time_base = tb
        stream.codec_context.time_base = tb
        if rotation:
            stream.set_display_rotation(rotation)
        if audio:
            astream = container.add_stream(audio, rate=16000)
            astream.layout = "mono"
        stamps = list(pts) if pts is not None else list(range(frames))
        for i, stamp in enumerate(stamps):
            frame = av.VideoFrame.from_ndarray(synthetic_image(i, width, height), format="bgr24")
            frame.pts = stamp
            frame.time_base = tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if audio:
            last = stamps[-1] * tb + Fraction(1, fps)
            _write_audio(container, audio, float(last))
    return path


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_video("name.mp4", frames=..., audio="aac", pts=[...], ...)`` in tmp_path."""

    def factory(name: str = "synthetic.mp4", **kwargs: object) -> Path:
        return _make_video(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.fixture(name="synthetic_image")
def synthetic_image_fixture() -> Callable[[int, int, int], np.ndarray]:
    """The pattern ``make_video`` encodes: ``synthetic_image(index, width, height)``."""
    return synthetic_image


@pytest.fixture
def sample_video() -> Path:
    """The shipped 2-second multi-face clip (60 frames, 640x360, AAC audio)."""
    assert SAMPLE_VIDEO.is_file(), "samples/crowd.mp4 is missing (see samples/README.md)"
    return SAMPLE_VIDEO


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models of the model tests run fastest on one thread, and the CPU is often
    shared: with several threads a busy machine makes them 30x slower (OpenMP spin-waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
