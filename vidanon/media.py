"""Video input/output with PyAV: probe, frame-exact streaming decode, re-encode with audio kept.

Design notes (the "why" behind choices that are easy to undo by accident):

* Timestamps are carried through untouched. The writer encodes each frame with the pts it was
  read with, in the input stream's time base, so variable-frame-rate footage keeps its timing
  and audio (stream-copied with its own timestamps) stays in sync.
* Frames are BGR ``uint8`` arrays because that is what OpenCV-based detectors expect.
* Colour: the decoder converts with the matrix the input is tagged with (BT.601 if untagged).
  The writer converts with BT.709 for HD (height > 576) and BT.601 otherwise, and tags the
  output explicitly, so players that honour tags and players that guess both show it right.
* libx264 rejects odd frame sizes with 4:2:0/4:2:2 chroma. Rather than pad (which the reader
  could not undo), odd-sized videos are encoded with full-resolution chroma (4:4:4), which keeps
  the exact size. Such files play in FFmpeg-based players but not in most browsers.
* Lossless mode uses ``libx264rgb`` at qp 0 on the BGR pixels themselves: a YUV 4:4:4 qp 0
  stream is *not* bit-exact after the RGB->YUV->RGB rounding (about 52 dB measured), and
  reversible anonymisation needs exact pixels.
* Known limits: only audio streams are carried over (subtitles/data are dropped); display
  matrix flips are dropped (rotation is kept); a truncated file is detected before decoding
  only when the container has a per-frame index (mp4/mov). A truncated Matroska/TS file reads
  as a shorter video.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np
from av.video.reformatter import Interpolation

from vidanon.errors import MediaError

__all__ = [
    "EncodeSettings",
    "Frame",
    "VideoInfo",
    "VideoWriter",
    "copy_video",
    "cut",
    "frame_pts",
    "join_parts",
    "probe",
    "read_frames",
    "read_span",
]

# pix_fmt -> the same depth with full-resolution chroma, used when the size is odd.
_FULL_CHROMA = {
    "yuv420p": "yuv444p",
    "yuvj420p": "yuvj444p",
    "nv12": "yuv444p",
    "yuv422p": "yuv444p",
    "yuv420p10le": "yuv444p10le",
    "yuv422p10le": "yuv444p10le",
}
# swscale flags for every BGR<->YUV conversion. Accurate rounding is on because recovery
# quality is bounded by what survives decode + encode: swscale's default fast path alone (no
# codec) costs ~43 dB luma / ~53 dB chroma per YUV->BGR->YUV pass on the clips in
# /work/shared/videos. Setting this to _ACCURATE_SWS measured 58-78 dB luma / 53-60 dB chroma,
# and re-encoding samples/crowd.mp4 at crf 12 went from ~40 dB to ~46 dB. It costs ~15 ms more
# per 1080p frame each way (small next to the diffusion). Stored detection expectations
# (tests/data/*_expected.json) were made with it on.
_ACCURATE_SWS = (
    Interpolation.BILINEAR
    | Interpolation.FULL_CHR_H_INT
    | Interpolation.FULL_CHR_H_INP
    | Interpolation.ACCURATE_RND
)
_SWS_FLAGS: Interpolation | None = _ACCURATE_SWS
# Audio is fed to the muxer at most this far ahead of the video, so memory stays constant
# while av_interleaved_write_frame still has both streams to interleave.
_AUDIO_LEAD_S = 1.0
# A frame interval that differs from the median interval by more than this fraction (and by
# more than one time-base tick, which is plain rounding) marks the stream as variable frame rate.
_VFR_TOLERANCE = 0.05


def _reason(exc: BaseException) -> str:
    """One-line cause for an FFmpeg/OS error, without errno noise or the repeated file name."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


def _read_error(path: Path, what: str) -> MediaError:
    return MediaError(f"cannot read video '{path}': {what}")


@dataclass(frozen=True)
class VideoInfo:
    """What the rest of vidanon needs to know about an input video, measured rather than trusted.

    ``rotation`` is the counter-clockwise display rotation in degrees, normalised to
    0/90/180/270 (FFmpeg's own sign convention, as ``VideoFrame.rotation``); frames are *not*
    rotated by the reader, so ``width``/``height`` are the stored (coded) size.
    """

    path: Path
    width: int
    height: int
    fps: Fraction
    frames: int
    duration_s: float
    time_base: Fraction
    rotation: int
    vfr: bool
    has_audio: bool
    codec: str

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types; fractions as exact "num/den" strings so sidecars lose nothing."""
        return {
            "path": str(self.path),
            "width": self.width,
            "height": self.height,
            "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "frames": self.frames,
            "duration_s": self.duration_s,
            "time_base": f"{self.time_base.numerator}/{self.time_base.denominator}",
            "rotation": self.rotation,
            "vfr": self.vfr,
            "has_audio": self.has_audio,
            "codec": self.codec,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoInfo:
        """Inverse of :meth:`as_dict`, so a sidecar can be turned back into writer settings."""
        return cls(
            path=Path(data["path"]),
            width=int(data["width"]),
            height=int(data["height"]),
            fps=Fraction(data["fps"]),
            frames=int(data["frames"]),
            duration_s=float(data["duration_s"]),
            time_base=Fraction(data["time_base"]),
            rotation=int(data["rotation"]),
            vfr=bool(data["vfr"]),
            has_audio=bool(data["has_audio"]),
            codec=str(data["codec"]),
        )


@dataclass
class Frame:
    """One decoded picture; ``index`` counts decoded frames from 0 in presentation order.

    ``pts`` is in the video stream's time base (``VideoInfo.time_base``); ``duration`` (same
    units, ``None`` if unknown) lets the writer give the last frame its true length.
    """

    index: int
    image: np.ndarray
    pts: int | None
    time: float
    duration: int | None = field(default=None, compare=False)


@dataclass
class EncodeSettings:
    """Encoder choice. crf 12 is visually transparent for faces; see module notes on lossless."""

    codec: str = "libx264"
    crf: int = 12
    preset: str = "medium"
    lossless: bool = False
    pix_fmt: str = "yuv420p"


# --------------------------------------------------------------------------------------------
# probing


def _open_input(path: Path) -> av.container.InputContainer:
    """Open with a MediaError for every way a user-supplied path can be wrong."""
    if not path.exists():
        raise _read_error(path, "file not found")
    if not path.is_file():
        raise _read_error(path, "not a file")
    if path.stat().st_size == 0:
        raise _read_error(path, "file is empty")
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError) as exc:
        raise _read_error(
            path, f"not a video, or the file is truncated or corrupt ({_reason(exc)})"
        ) from exc


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        container.close()
        # FFmpeg's mp4 demuxer drops tracks without samples, so an mp4 whose video track is
        # empty lands here too.
        raise _read_error(path, "no video stream (or the video track has no frames)")
    return container.streams.video[0]


def _truncation(stream: av.VideoStream, path: Path) -> str | None:
    """Detect a cut-off file from the sample index (mp4/mov have one covering every frame).

    A truncated file whose index survived (moov at the front) demuxes "cleanly" and just ends
    early, so without this check it would silently lose its tail. Checked before decoding so
    a long job fails at once rather than after processing the readable part.
    """
    size = path.stat().st_size
    total = present = 0
    for entry in stream.index_entries:
        total += 1
        present += entry.pos + entry.size <= size
    if present < total:
        return f"file is truncated or corrupt (only {present} of {total} video frames are present)"
    return None


def _normalise_rotation(degrees: int) -> int:
    return int(round(degrees / 90.0)) * 90 % 360


def _open_video(path: Path) -> tuple[av.container.InputContainer, av.VideoStream]:
    """Open ``path`` and its video stream, refusing a file whose frame index is cut short."""
    container = _open_input(path)
    try:
        stream = _video_stream(container, path)
        truncated = _truncation(stream, path)
        if truncated:
            raise _read_error(path, truncated)
    except BaseException:
        container.close()
        raise
    return container, stream


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Measure a video by demuxing every video packet (no full decode) and decoding one frame.

    Container headers are often wrong or missing for frame counts and frame rates, so the count
    comes from the packets themselves; decoding the first frame proves the stream is decodable
    and gives the true picture size and display rotation.
    """
    path = Path(path)
    container, stream = _open_video(path)
    with container:
        stream.thread_type = "SLICE"  # frame threading would delay the first frame
        first: av.VideoFrame | None = None
        pts_list: list[int] = []
        count = 0
        end_pts: int | None = None
        decode_error: str | None = None
        try:
            for packet in container.demux(stream):
                if packet.size > 0 and not packet.is_discard:
                    count += 1
                    if packet.pts is not None:
                        pts_list.append(packet.pts)
                        stop = packet.pts + (packet.duration or 0)
                        end_pts = stop if end_pts is None else max(end_pts, stop)
                if first is None:
                    try:
                        frames = stream.decode(packet)
                    except av.FFmpegError as exc:
                        decode_error = _reason(exc)
                        frames = []
                    if frames:
                        first = frames[0]
        except av.FFmpegError as exc:
            raise _read_error(path, f"file is truncated or corrupt ({_reason(exc)})") from exc
        if count == 0:
            raise _read_error(path, "video stream has no frames")
        if first is None:
            detail = f" ({decode_error})" if decode_error else ""
            raise _read_error(
                path, f"file is truncated or corrupt (no decodable video frames){detail}"
            )

        time_base = stream.time_base or Fraction(1, 90000)
        pts_list.sort()
        deltas = [b - a for a, b in zip(pts_list, pts_list[1:], strict=False)]
        vfr = _is_vfr(deltas)
        if pts_list and end_pts is not None and end_pts > pts_list[-1]:
            duration_s = float((end_pts - pts_list[0]) * time_base)
        elif len(pts_list) >= 2:
            median = sorted(deltas)[len(deltas) // 2]
            duration_s = float((pts_list[-1] - pts_list[0] + median) * time_base)
        else:
            duration_s = float(container.duration or 0) / av.time_base
        fps = stream.average_rate or stream.guessed_rate
        if not fps and duration_s > 0:
            fps = Fraction(count / duration_s).limit_denominator(1001)
        return VideoInfo(
            path=path,
            width=first.width,
            height=first.height,
            fps=Fraction(fps or 0),
            frames=count,
            duration_s=duration_s,
            time_base=Fraction(time_base),
            rotation=_normalise_rotation(first.rotation),
            vfr=vfr,
            has_audio=bool(container.streams.audio),
            codec=stream.codec_context.name,
        )


def _is_vfr(deltas: list[int]) -> bool:
    """Irregular frame intervals, ignoring the one-tick jitter of rounding to a coarse time base."""
    if len(deltas) < 2:
        return False
    median = sorted(deltas)[len(deltas) // 2]
    allowed = max(1.0, _VFR_TOLERANCE * median)
    return any(abs(d - median) > allowed for d in deltas)


# --------------------------------------------------------------------------------------------
# reading


def read_frames(path: str | os.PathLike[str], start: int = 0) -> Iterator[Frame]:
    """Decode frames one at a time (constant memory), yielding those from index ``start`` on.

    Frames before ``start`` are decoded but not converted. It does not seek: mp4 indexes hold
    decode timestamps, and with B-frames or open GOPs a seek cannot be tied to an exact frame
    number. Failures are MediaErrors naming the frame reached, so a corrupt tail cannot pass
    for a short video.
    """
    if start < 0:
        raise ValueError("start must be >= 0")
    path = Path(path)
    container, stream = _open_video(path)
    with container:
        stream.thread_type = "AUTO"
        time_base = Fraction(stream.time_base or 1)
        reached = [0]
        for av_frame in _decoded(container, stream, path, reached):
            index = reached[0]
            reached[0] += 1
            if index >= start:
                yield _to_frame(av_frame, index, time_base)


def frame_pts(path: str | os.PathLike[str]) -> list[int] | None:
    """Presentation timestamps of every frame, in order (demux only), or None if any is missing.

    ``read_span`` uses them to seek to a frame by number and to check that it landed there:
    frame numbers (decode counts) are what the plan uses, timestamps are what a seek can use.
    """
    path = Path(path)
    container, stream = _open_video(path)
    with container:
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size > 0 and not packet.is_discard:
                    if packet.pts is None:
                        return None
                    pts.append(packet.pts)
        except av.FFmpegError as exc:
            raise _read_error(path, f"file is truncated or corrupt ({_reason(exc)})") from exc
    pts.sort()
    if any(b <= a for a, b in zip(pts, pts[1:])):
        return None  # repeated timestamps: a pts does not name one frame
    return pts


class _SeekMiss(Exception):
    """A seek that did not land where the frame index says (the caller decodes from the start)."""


def _seek_span(path: Path, start: int, pts: list[int]) -> Iterator[Frame]:
    """Frames ``start .. start + len(pts) - 1``, decoded from the keyframe before ``pts[0]``.

    Raises ``_SeekMiss`` before yielding anything if the stream cannot be entered there
    (no index, or the decoder's timestamps are not the packets'); a mismatch after the first
    frame is a corrupt stream, not a miss.
    """
    container, stream = _open_video(path)
    with container:
        stream.thread_type = "AUTO"
        time_base = Fraction(stream.time_base or 1)
        try:
            container.seek(pts[0], stream=stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            raise _SeekMiss from exc
        k = 0
        try:
            for av_frame in container.decode(stream):
                if av_frame.pts is None:
                    if k == 0:
                        raise _SeekMiss
                    raise _read_error(path, f"frame {start + k} has no timestamp")
                if k == 0 and av_frame.pts < pts[0]:
                    continue  # the rest of the GOP before the span
                if av_frame.pts != pts[k]:
                    if k == 0:
                        raise _SeekMiss
                    raise _read_error(path, f"frame {start + k} has timestamp {av_frame.pts}, "
                                      f"expected {pts[k]} (corrupt stream?)")
                yield _to_frame(av_frame, start + k, time_base)
                k += 1
                if k == len(pts):
                    return
        except av.FFmpegError as exc:
            raise _read_error(path, f"file is truncated or corrupt (decoding failed at frame "
                              f"{start + k}: {_reason(exc)})") from exc
        if k == 0:
            raise _SeekMiss
        raise _read_error(path, f"file is truncated or corrupt (ends at frame {start + k})")


def read_span(path: str | os.PathLike[str], start: int, stop: int,
              pts: list[int] | None = None) -> Iterator[Frame]:
    """Frames ``start <= index < stop``, the same pixels and indices as ``read_frames`` gives.

    With ``pts`` (the span's timestamps from ``frame_pts``) the reader seeks to the keyframe
    before the span instead of decoding everything before it, so a worker rendering the last
    minute of a ten-hour video does not decode ten hours first; if the seek cannot be
    verified it falls back to decoding from the start.
    """
    path = Path(path)
    if pts is not None and start > 0:
        if len(pts) != stop - start:
            raise ValueError("pts must hold one timestamp per frame of the span")
        try:
            yield from _seek_span(path, start, pts)
            return
        except _SeekMiss:
            pass
    frames = read_frames(path, start)
    try:
        for frame in frames:
            if frame.index >= stop:
                break
            yield frame
    finally:
        frames.close()


def _to_frame(frame: av.VideoFrame, index: int, time_base: Fraction) -> Frame:
    image = frame.to_ndarray(format="bgr24", interpolation=_SWS_FLAGS)
    if not image.flags.c_contiguous:
        image = np.ascontiguousarray(image)
    time = float(frame.pts * time_base) if frame.pts is not None else float(frame.time or 0.0)
    return Frame(
        index=index, image=image, pts=frame.pts, time=time, duration=frame.duration or None
    )


def _decoded(
    container: av.container.InputContainer, stream: av.VideoStream, path: Path, reached: list[int]
) -> Iterator[av.VideoFrame]:
    """Decoded frames, with FFmpeg failures turned into a MediaError at frame ``reached[0]``."""
    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        raise _read_error(
            path,
            f"file is truncated or corrupt (decoding failed at frame {reached[0]}: {_reason(exc)})",
        ) from exc
    if reached[0] == 0:
        raise _read_error(path, "file is truncated or corrupt (no decodable video frames)")


# --------------------------------------------------------------------------------------------
# writing


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


class _AudioCopier:
    """Stream-copies every audio stream of a source file into an output container.

    Packets are pulled lazily so audio is muxed alongside the video (proper interleaving,
    constant memory) rather than appended at the end. ``window`` keeps packets starting in
    [start, end) seconds and shifts them by -start (used by :func:`cut`).
    """

    def __init__(
        self,
        source: Path,
        output: av.container.OutputContainer,
        window: tuple[float, float] | None = None,
    ) -> None:
        self._input = _open_input(source)
        self._source = source
        self._map: dict[int, av.stream.Stream] = {}
        for stream in self._input.streams.audio:
            self._map[stream.index] = output.add_stream_from_template(stream)
        self._window = window
        self._packets: Iterator[av.Packet] | None = None
        self._pending: av.Packet | None = None
        self._ended: set[int] = set()
        self.done = not self._map

    def _next(self) -> av.Packet | None:
        if self._packets is None:
            streams = [self._input.streams[i] for i in self._map]
            if self._window is not None:
                first = streams[0]
                offset = int(self._window[0] / (first.time_base or Fraction(1, 1)))
                with contextlib.suppress(av.FFmpegError):
                    self._input.seek(max(0, offset - 1), stream=first, backward=True)
            self._packets = self._input.demux(streams)
        try:
            for packet in self._packets:
                if packet.size == 0 or packet.pts is None or packet.dts is None:
                    continue
                if self._window is not None:
                    start, end = self._window
                    t = float(packet.pts * packet.time_base)
                    if t < start - 1e-6:
                        continue
                    if t >= end - 1e-6:
                        self._ended.add(packet.stream_index)
                        if len(self._ended) == len(self._map):
                            return None
                        continue
                    shift = round(Fraction(start) / packet.time_base)
                    packet.pts -= shift
                    packet.dts -= shift
                return packet
        except av.FFmpegError as exc:
            raise _read_error(self._source, f"audio is corrupt ({_reason(exc)})") from exc
        return None

    def mux_until(self, output: av.container.OutputContainer, until_s: float | None) -> None:
        """Mux audio packets that start before ``until_s`` seconds (all of them if None)."""
        while not self.done:
            packet = self._pending or self._next()
            self._pending = None
            if packet is None:
                self.done = True
                break
            if until_s is not None and float(packet.pts * packet.time_base) > until_s:
                self._pending = packet
                break
            packet.stream = self._map[packet.stream_index]
            output.mux(packet)

    def close(self) -> None:
        self._input.close()


class VideoWriter:
    """Encodes frames to ``path`` atomically: a partial file never appears under that name.

    Output goes to ``<stem>.partial-<pid>-XXXX<suffix>`` in the destination folder (same filesystem,
    so the final ``os.replace`` is atomic) and is deleted if anything fails.

    Rotation is kept by writing the input's display matrix as stream side data
    (``VideoStream.set_display_rotation``, PyAV >= 18); flips in the matrix are not kept.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        info: VideoInfo,
        settings: EncodeSettings | None = None,
        audio_from: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.info = info
        self.settings = settings if settings is not None else EncodeSettings()
        self.audio_from = Path(audio_from) if audio_from is not None else None
        for source in (info.path, self.audio_from):
            if source is not None and _same_file(self.path, Path(source)):
                raise MediaError(
                    f"cannot write video '{self.path}': it is the input file; "
                    "choose a different output path"
                )
        # Set by cut(): keep only audio in [start, end) seconds, shifted to start at 0.
        self._audio_window: tuple[float, float] | None = None
        self._tmp: Path | None = None
        self._out: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._audio: _AudioCopier | None = None
        self._pix_fmt = "yuv420p"
        self._colour: dict[str, Any] = {}
        self._written = 0
        self._last_pts: int | None = None
        self._nominal = 1

    # -- setup ---------------------------------------------------------------------------

    def _codec_and_options(self) -> tuple[str, str, dict[str, str]]:
        s = self.settings
        w, h = self.info.width, self.info.height
        if s.lossless:
            if s.codec in ("libx264", "libx264rgb"):
                if "libx264rgb" in av.codecs_available:
                    return "libx264rgb", "bgr24", {"qp": "0", "preset": s.preset}
                return "libx264", "yuv444p", {"qp": "0", "preset": s.preset}
            return s.codec, _FULL_CHROMA.get(s.pix_fmt, s.pix_fmt), {"crf": "0"}
        pix_fmt = s.pix_fmt
        if (w % 2 or h % 2) and pix_fmt in _FULL_CHROMA:
            pix_fmt = _FULL_CHROMA[pix_fmt]
        options: dict[str, str] = {}
        if s.codec in ("libx264", "libx264rgb", "libx265"):
            options = {"crf": str(s.crf), "preset": s.preset}
        return s.codec, pix_fmt, options

    def __enter__(self) -> VideoWriter:
        folder = self.path.parent
        if not folder.is_dir():
            raise MediaError(f"cannot write video '{self.path}': folder '{folder}' does not exist")
        suffix = self.path.suffix or ".mp4"
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f"{self.path.stem}.partial-{os.getpid()}-", suffix=suffix, dir=folder
            )
        except OSError as exc:
            raise MediaError(f"cannot write video '{self.path}': {_reason(exc)}") from exc
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._open()
        except BaseException:
            self._abort()
            raise
        return self

    def _open(self) -> None:
        assert self._tmp is not None
        info = self.info
        codec, pix_fmt, options = self._codec_and_options()
        try:
            self._out = av.open(
                str(self._tmp), mode="w", format=None if self.path.suffix else "mp4"
            )
            stream = self._out.add_stream(codec, rate=info.fps or None, options=options)
            assert isinstance(stream, av.VideoStream)
            self._configure(stream, pix_fmt)
            # Open the encoder now so bad settings fail here, not at the first frame.
            stream.codec_context.open()
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(
                f"cannot write video '{self.path}': cannot set up encoder '{codec}' "
                f"with {pix_fmt} at {info.width}x{info.height} ({_reason(exc)})"
            ) from exc

    def _configure(self, stream: av.VideoStream, pix_fmt: str) -> None:
        info = self.info
        stream.width = info.width
        stream.height = info.height
        stream.pix_fmt = pix_fmt
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        if pix_fmt not in ("bgr24", "rgb24", "gbrp"):
            hd = info.height > 576
            # AVCOL_SPC/PRI/TRC: 1 = BT.709, 6 = SMPTE 170M (BT.601); range 1 = limited.
            tag = 1 if hd else 6
            stream.codec_context.colorspace = tag
            stream.codec_context.color_primaries = tag
            stream.codec_context.color_trc = tag
            stream.codec_context.color_range = 1
            self._colour = {
                "dst_colorspace": "itu709" if hd else "itu601",
                "dst_color_range": "MPEG",
            }
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        self._stream = stream
        self._pix_fmt = pix_fmt
        if info.fps and info.time_base:
            self._nominal = max(1, round(1 / (info.fps * info.time_base)))

    # -- writing -------------------------------------------------------------------------

    def write(self, frame: Frame) -> None:
        """Encode one frame at its own pts (in ``info.time_base``), so VFR timing survives."""
        if self._out is None or self._stream is None:
            raise RuntimeError("VideoWriter.write() called outside its 'with' block")
        image = frame.image
        shape = (self.info.height, self.info.width, 3)
        if image.shape != shape or image.dtype != np.uint8:
            raise ValueError(
                f"frame {frame.index}: expected a {shape} uint8 BGR image, "
                f"got {image.shape} {image.dtype}"
            )
        pts = frame.pts
        if pts is None:
            pts = (
                round(Fraction(frame.time) / self.info.time_base)
                if frame.time
                else (self._written * self._nominal)
            )
        if self._last_pts is not None and pts <= self._last_pts:
            raise ValueError(
                f"frame {frame.index}: pts {pts} does not increase (previous {self._last_pts})"
            )
        if self._written == 0 and self.audio_from is not None:
            # Opened at the first frame (not in __enter__) so cut() can set the audio window
            # once it knows where the video starts; still before anything is muxed.
            self._audio = _AudioCopier(self.audio_from, self._out, self._audio_window)
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        if self._pix_fmt != "bgr24":
            vf = vf.reformat(format=self._pix_fmt, interpolation=_SWS_FLAGS, **self._colour)
        vf.pts = pts
        vf.time_base = self.info.time_base
        vf.duration = frame.duration or self._nominal
        self._last_pts = pts
        self._written += 1
        self._encode(vf)

    def _encode(self, frame: av.VideoFrame | None) -> None:
        """Encode (None flushes) and mux, then top up audio to just past the video's time."""
        assert self._out is not None and self._stream is not None
        try:
            latest: float | None = None
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
                if packet.dts is not None:
                    latest = float(packet.dts * packet.time_base)
            if self._audio is not None and latest is not None:
                self._audio.mux_until(self._out, latest + _AUDIO_LEAD_S)
        except av.FFmpegError as exc:
            raise MediaError(f"cannot write video '{self.path}': {_reason(exc)}") from exc

    # -- finishing -----------------------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise

    def _finish(self) -> None:
        assert self._out is not None and self._stream is not None and self._tmp is not None
        if self._written == 0:
            raise MediaError(f"cannot write video '{self.path}': no frames were written")
        self._encode(None)
        try:
            if self._audio is not None:
                self._audio.mux_until(self._out, None)
                self._audio.close()
                self._audio = None
            self._out.close()
            self._out = None
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
            os.replace(self._tmp, self.path)
        except (av.FFmpegError, OSError) as exc:
            raise MediaError(f"cannot write video '{self.path}': {_reason(exc)}") from exc
        self._tmp = None

    def _abort(self) -> None:
        """Release everything and delete the partial file; errors here must not mask the cause."""
        if self._audio is not None:
            with contextlib.suppress(Exception):
                self._audio.close()
            self._audio = None
        if self._out is not None:
            with contextlib.suppress(Exception):
                self._out.close()
            self._out = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None


def join_parts(
    parts: list[tuple[Path, int]],
    dst: str | os.PathLike[str],
    info: VideoInfo,
    audio_from: str | os.PathLike[str] | None = None,
) -> None:
    """Concatenate encoded segments into ``dst`` by stream copy; audio from ``audio_from`` once.

    No frame is re-encoded: each part is its own encode, starting with a keyframe and
    referencing nothing before it (closed GOP), and every part keeps the pts its frames had in
    the input, so packets only need new decode timestamps.  Those are the presentation
    timestamps delayed by the encoder's reorder depth (``has_b_frames``), computed in one
    streaming pass with a heap: the i-th packet gets the (i - depth)-th smallest pts, which a
    decoder reordering at most ``depth`` frames has always seen by then.  Parts must share
    codec parameters (same settings, so the same SPS/PPS); anything else is an error, not a
    silent re-encode.  Written to a temporary name and renamed, like ``VideoWriter``.

    ``parts``: (file, offset) in order; each part's frames were written with ``offset``
    subtracted from their pts, so the part starts at 0: an mp4 that starts later records the
    delay in its edit list in milliseconds, which does not survive the round trip exactly.
    """
    import heapq

    dst = Path(dst)
    if not parts:
        raise MediaError(f"cannot write video '{dst}': no segments to join")
    suffix = dst.suffix or ".mp4"
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{dst.stem}.partial-{os.getpid()}-",
                                        suffix=suffix, dir=dst.parent)
    except OSError as exc:
        raise MediaError(f"cannot write video '{dst}': {_reason(exc)}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    out: av.container.OutputContainer | None = None
    audio: _AudioCopier | None = None
    try:
        out = av.open(str(tmp), mode="w", format=None if dst.suffix else "mp4")
        first = _open_input(Path(parts[0][0]))
        with first:
            template = first.streams.video[0]
            ostream = out.add_stream_from_template(template)
            extradata = bytes(template.codec_context.extradata or b"")
        ostream.time_base = info.time_base
        if info.rotation:
            ostream.set_display_rotation(info.rotation)
        if audio_from is not None:
            audio = _AudioCopier(Path(audio_from), out)
        heap: list[int] = []
        written = 0
        last_dts: int | None = None
        depth: int | None = None
        lead: list[int] = []  # the first part's leading packets, until its delay is known
        for part, packet in _part_packets(parts, extradata, info.time_base):
            if depth is None:
                # The encoder's delay: packets decoded before the first (keyframe) pts.
                lead.append(packet.pts)
                if packet.dts is None or packet.dts >= lead[0]:
                    depth = len(lead) - 1
            heapq.heappush(heap, packet.pts)
            if depth is not None and len(heap) > depth:
                dts = heapq.heappop(heap)
            else:  # the stream's first frames: the encoder's own decode times
                dts = packet.dts if packet.dts is not None else packet.pts
            if (last_dts is not None and dts <= last_dts) or dts > packet.pts:
                raise MediaError(f"cannot join '{part.name}': decode order does not fit its "
                                 "timestamps (is each segment a closed GOP?)")
            packet.dts = dts
            packet.stream = ostream
            out.mux(packet)
            last_dts = dts
            written += 1
            if audio is not None:
                audio.mux_until(out, float(dts * info.time_base) + _AUDIO_LEAD_S)
        if written != info.frames:
            raise MediaError(f"cannot write video '{dst}': the segments hold {written} frames, "
                             f"the input {info.frames}")
        if audio is not None:
            audio.mux_until(out, None)
            audio.close()
            audio = None
        out.close()
        out = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot write video '{dst}': {_reason(exc)}") from exc
    finally:
        if audio is not None:
            with contextlib.suppress(Exception):
                audio.close()
        if out is not None:
            with contextlib.suppress(Exception):
                out.close()
        tmp.unlink(missing_ok=True)


def _part_packets(parts: list[tuple[Path, int]], extradata: bytes,
                  time_base: Fraction) -> Iterator[tuple[Path, av.Packet]]:
    """The video packets of every part in order, at their timestamps in the whole video."""
    for part, offset in parts:
        part = Path(part)
        container, stream = _open_video(part)
        with container:
            if bytes(stream.codec_context.extradata or b"") != extradata:
                raise MediaError(f"cannot join '{part.name}': its encoder parameters differ "
                                 "from the first segment's")
            if Fraction(stream.time_base or 0) != time_base:
                raise MediaError(f"cannot join '{part.name}': time base {stream.time_base} "
                                 f"is not {time_base}")
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if packet.pts is None:
                    raise MediaError(f"cannot join '{part.name}': a packet has no pts")
                packet.pts += offset
                if packet.dts is not None:
                    packet.dts += offset
                yield part, packet


def copy_video(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    settings: EncodeSettings | None = None,
) -> VideoInfo:
    """Re-encode every frame unchanged, audio stream-copied; the output a "no faces" run makes."""
    info = probe(src)
    with VideoWriter(dst, info, settings, audio_from=info.path) as writer:
        for frame in read_frames(info.path):
            writer.write(frame)
    return probe(dst)


def cut(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    start_s: float,
    duration_s: float,
    settings: EncodeSettings | None = None,
) -> VideoInfo:
    """Re-encode the frames in [start_s, start_s + duration_s) and stream-copy that span's audio.

    Times are relative to the first video frame (many files start at a non-zero pts); the
    output starts at 0. Audio packets are copied whole, so the audio may start up to one packet
    (about 23 ms for AAC) after the video.
    """
    if duration_s <= 0 or start_s < 0:
        raise ValueError("need start_s >= 0 and duration_s > 0")
    info = probe(src)
    audio_from = info.path if info.has_audio else None
    frames = read_frames(info.path)
    t0: float | None = None
    shift: int | None = None
    index = 0
    try:
        with VideoWriter(dst, info, settings, audio_from=audio_from) as writer:
            for frame in frames:
                t0 = frame.time if t0 is None else t0
                rel = frame.time - t0
                if rel < start_s - 1e-9:
                    continue
                if rel >= start_s + duration_s - 1e-9:
                    break
                if shift is None:
                    shift = frame.pts or 0
                    writer._audio_window = (frame.time, frame.time + duration_s)
                pts = None if frame.pts is None else frame.pts - shift
                time = float((pts or 0) * info.time_base)
                writer.write(Frame(index, frame.image, pts, time, frame.duration))
                index += 1
    finally:
        frames.close()
    return probe(dst)
