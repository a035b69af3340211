"""Tests for vidanon.media: probing, exact decoding, re-encoding with timing and audio kept."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from vidanon.errors import MediaError, VidanonError
from vidanon.media import (
    EncodeSettings,
    Frame,
    VideoInfo,
    VideoWriter,
    copy_video,
    cut,
    probe,
    read_frames,
)

MakeVideo = Callable[..., Path]
FAST = EncodeSettings(preset="ultrafast")  # crf 12 as default; the preset only costs size


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def packets(path: Path, kind: str) -> tuple[list[av.Packet], str, Fraction]:
    """Non-empty packets of the first stream of ``kind``, with its codec name and time base."""
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        found = [p for p in container.demux(stream) if p.size > 0]
        return found, stream.codec_context.name, Fraction(stream.time_base)


def span_s(found: list[av.Packet]) -> float:
    start = min(p.pts for p in found)
    end = max(p.pts + p.duration for p in found)
    return float((end - start) * found[0].time_base)


def times(frames: list[Frame]) -> list[Fraction]:
    return [Fraction(f.pts) for f in frames]


def assert_one_line_naming(err: pytest.ExceptionInfo[MediaError], path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert f"'{path}'" in message


# --------------------------------------------------------------------------------------------
# probe


def test_probe_fields(make_video: MakeVideo) -> None:
    path = make_video("a.mp4", frames=15, fps=15, audio="aac")
    info = probe(path)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == 15
    assert info.frames == 15
    assert info.duration_s == pytest.approx(1.0, abs=1e-6)
    assert info.time_base.denominator % 15 == 0  # mp4 scales 1/15 up, but stays exact
    assert (info.rotation, info.vfr, info.has_audio, info.codec) == (0, False, True, "h264")
    assert info.path == path
    data = json.loads(json.dumps(info.as_dict()))
    assert data["fps"] == "15/1"
    assert VideoInfo.from_dict(data) == info


def test_probe_sample(sample_video: Path) -> None:
    info = probe(sample_video)
    assert (info.width, info.height, info.frames) == (640, 360, 60)
    assert info.fps == Fraction(2997, 100)
    assert info.has_audio and not info.vfr
    assert info.duration_s == pytest.approx(60 / 29.97, abs=1e-3)
    assert sample_video.stat().st_size <= 2 * 1024 * 1024
    assert sum(1 for _ in read_frames(sample_video)) == info.frames


def test_frame_count_exact_without_header_count(make_video: MakeVideo) -> None:
    path = make_video("a.mkv", frames=17)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no frame count
    assert probe(path).frames == 17 == sum(1 for _ in read_frames(path))


def test_rotation_is_read(make_video: MakeVideo) -> None:
    assert probe(make_video("r.mp4", rotation=90, frames=3)).rotation == 90
    assert probe(make_video("r270.mp4", rotation=270, frames=3)).rotation == 270


def test_vfr_detected(make_video: MakeVideo) -> None:
    pts = [0, 40, 80, 200, 240, 400, 433, 466, 700, 733]
    info = probe(make_video("v.mp4", pts=pts, time_base=Fraction(1, 1000), fps=25))
    assert info.vfr
    assert info.frames == len(pts)
    assert not probe(make_video("c.mp4", fps=30, frames=10)).vfr


# --------------------------------------------------------------------------------------------
# read_frames


def test_read_frames_shape_and_order(
    make_video: MakeVideo, synthetic_image: Callable[[int, int, int], np.ndarray]
) -> None:
    path = make_video("a.mp4", size=(64, 48), frames=12)
    frames = list(read_frames(path))
    assert [f.index for f in frames] == list(range(12))
    for f in frames:
        assert f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8
        assert f.image.flags.c_contiguous
    assert all(a.time < b.time for a, b in zip(frames, frames[1:], strict=False))
    assert psnr(frames[5].image, synthetic_image(5, 64, 48)) > 35


@pytest.mark.parametrize("name", ["sample", "mkv"])
def test_read_frames_start_matches_full_read(
    name: str, sample_video: Path, make_video: MakeVideo
) -> None:
    path = sample_video if name == "sample" else make_video("a.mkv", frames=20)
    full = list(read_frames(path))
    start = 37 if name == "sample" else 11
    tail = list(read_frames(path, start=start))
    assert [f.index for f in tail] == [f.index for f in full[start:]]
    assert [f.pts for f in tail] == [f.pts for f in full[start:]]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(tail, full[start:], strict=True))
    assert list(read_frames(path, start=len(full))) == []


# --------------------------------------------------------------------------------------------
# writing


@pytest.mark.parametrize("audio", ["aac", "pcm_s16le"])
def test_round_trip_keeps_frames_timing_pixels_audio(
    audio: str, make_video: MakeVideo, tmp_path: Path
) -> None:
    src = make_video(f"in_{audio}.mp4", frames=20, fps=10, audio=audio)
    out = tmp_path / "out.mp4"
    info = copy_video(src, out, EncodeSettings(crf=12, preset="ultrafast"))
    src_info = probe(src)
    assert (info.frames, info.fps, info.width, info.height) == (20, 10, 64, 48)
    assert info.duration_s == pytest.approx(src_info.duration_s, abs=1e-6)
    a, b = list(read_frames(src)), list(read_frames(out))
    assert [f.time for f in a] == [f.time for f in b]
    assert min(psnr(x.image, y.image) for x, y in zip(a, b, strict=True)) > 40

    in_pk, in_codec, _ = packets(src, "audio")
    out_pk, out_codec, _ = packets(out, "audio")
    assert (len(out_pk), out_codec) == (len(in_pk), in_codec)
    assert span_s(out_pk) == pytest.approx(span_s(in_pk), abs=1 / 10)
    assert [bytes(p) for p in out_pk] == [bytes(p) for p in in_pk]  # copied, not re-encoded


def test_vfr_round_trip_keeps_timestamps(make_video: MakeVideo, tmp_path: Path) -> None:
    pts = [0, 40, 80, 200, 240, 400, 433, 466, 700, 733, 1000]
    src = make_video("v.mp4", pts=pts, time_base=Fraction(1, 1000), fps=25)
    out = copy_video(src, tmp_path / "out.mp4", FAST)
    a, b = list(read_frames(src)), list(read_frames(out.path))
    assert out.vfr and out.frames == len(pts)
    assert [Fraction(f.pts) * probe(src).time_base for f in a] == [
        Fraction(f.pts) * out.time_base for f in b
    ]
    assert [f.time for f in b] == pytest.approx([p / 1000 for p in pts])


def test_lossless_is_bit_exact(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("a.mp4", frames=6)
    out = copy_video(src, tmp_path / "ll.mp4", EncodeSettings(lossless=True, preset="ultrafast"))
    a, b = list(read_frames(src)), list(read_frames(out.path))
    assert len(a) == len(b) == 6
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))


def test_odd_size_keeps_size(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("odd.mp4", size=(65, 49), frames=8)
    out = copy_video(src, tmp_path / "odd_out.mp4", FAST)
    assert (out.width, out.height, out.frames) == (65, 49, 8)
    a, b = list(read_frames(src)), list(read_frames(out.path))
    assert b[0].image.shape == (49, 65, 3)
    assert min(psnr(x.image, y.image) for x, y in zip(a, b, strict=True)) > 40


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_preserved(rotation: int, make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("r.mp4", rotation=rotation, frames=3)
    assert copy_video(src, tmp_path / "out.mp4", FAST).rotation == rotation


def test_copy_sample_keeps_audio(sample_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "crowd_copy.mp4"
    info = copy_video(sample_video, out, FAST)
    src = probe(sample_video)
    assert (info.frames, info.fps, info.time_base) == (src.frames, src.fps, src.time_base)
    a, b = list(read_frames(sample_video)), list(read_frames(out))
    assert [f.pts for f in a] == [f.pts for f in b]
    # Real footage at crf 12 (measured 40.0 min / 40.4 mean): most of the loss is swscale's
    # default BGR<->YUV conversion, see media._SWS_FLAGS.
    values = [psnr(x.image, y.image) for x, y in zip(a, b, strict=True)]
    assert min(values) > 39 and np.mean(values) > 40
    in_pk, in_codec, in_tb = packets(sample_video, "audio")
    out_pk, out_codec, out_tb = packets(out, "audio")
    assert (len(out_pk), out_codec) == (len(in_pk), in_codec)
    assert [p.pts * out_tb for p in out_pk] == [p.pts * in_tb for p in in_pk]
    assert span_s(out_pk) == pytest.approx(span_s(in_pk), abs=1 / 29.97)


def test_audio_is_interleaved_in_long_video(make_video: MakeVideo, tmp_path: Path) -> None:
    # Over 10 s, FFmpeg's interleaver stops waiting for a missing stream, so audio appended
    # only at the end would land after all the video.
    src = make_video("long.mp4", size=(32, 24), frames=140, fps=10, audio="aac")
    out = copy_video(src, tmp_path / "out.mp4", FAST)
    with av.open(str(out.path)) as container:
        layout = "".join(
            t for _, t in sorted((p.pos, p.stream.type[0]) for p in container.demux() if p.size > 0)
        )
    assert layout.count("a") > 100 and layout.count("v") == 140
    assert max(len(run) for run in layout.split("a")) < 10  # never 1 s of video without audio


def test_cut_rebases_to_zero_and_trims_audio(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("a.mp4", frames=30, fps=10, audio="aac")
    info = cut(src, tmp_path / "cut.mp4", 1.0, 1.5, FAST)
    assert info.frames == 15
    frames = list(read_frames(info.path))
    assert frames[0].time == 0.0
    assert psnr(frames[0].image, list(read_frames(src, start=10))[0].image) > 40
    audio, _, _ = packets(info.path, "audio")
    assert span_s(audio) == pytest.approx(1.5, abs=0.1)


def test_exception_mid_write_leaves_nothing(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("in.mp4", frames=12, audio="aac")
    out = tmp_path / "out.mp4"
    before = set(tmp_path.iterdir())
    info = probe(src)
    with (
        pytest.raises(RuntimeError, match="boom"),
        VideoWriter(out, info, FAST, audio_from=src) as writer,
    ):
        for frame in read_frames(src):
            writer.write(frame)
            if frame.index == 6:
                partial = set(tmp_path.iterdir()) - before
                assert [p.name.startswith("out.partial-") for p in partial] == [True]
                raise RuntimeError("boom")
    assert set(tmp_path.iterdir()) == before
    assert not out.exists()


def test_no_frames_written_is_an_error(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("in.mp4", frames=3)
    before = set(tmp_path.iterdir())
    with pytest.raises(MediaError, match="no frames"), VideoWriter(tmp_path / "o.mp4", probe(src)):
        pass
    assert set(tmp_path.iterdir()) == before


def test_writing_onto_input_is_refused(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("in.mp4", frames=3, audio="aac")
    original = src.read_bytes()
    info = probe(src)
    with pytest.raises(MediaError, match="input"):
        VideoWriter(src, info)
    with pytest.raises(MediaError, match="input"):
        VideoWriter(tmp_path / "." / "in.mp4", info)  # same file, different spelling
    other = make_video("other.mp4", frames=3)
    with pytest.raises(MediaError, match="input"):
        VideoWriter(src, probe(other), audio_from=src)
    with pytest.raises(MediaError):
        copy_video(src, src)
    assert src.read_bytes() == original


def test_bad_encoder_settings_fail_early(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("in.mp4", frames=3)
    info = probe(src)
    before = set(tmp_path.iterdir())
    with (
        pytest.raises(MediaError, match="encoder 'libx264'"),
        VideoWriter(tmp_path / "o.mp4", info, EncodeSettings(preset="no-such-preset")),
    ):
        pytest.fail("__enter__ should have raised")
    assert set(tmp_path.iterdir()) == before


def test_wrong_frame_shape_is_rejected(make_video: MakeVideo, tmp_path: Path) -> None:
    src = make_video("in.mp4", frames=3)
    info = probe(src)
    with (
        pytest.raises(ValueError, match="expected"),
        VideoWriter(tmp_path / "o.mp4", info, FAST) as writer,
    ):
        writer.write(Frame(0, np.zeros((10, 10, 3), np.uint8), 0, 0.0))
    assert not (tmp_path / "o.mp4").exists()


# --------------------------------------------------------------------------------------------
# unreadable input


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(MediaError, match="not found") as err:
        probe(path)
    assert_one_line_naming(err, path)
    assert isinstance(err.value, VidanonError)
    with pytest.raises(MediaError, match="not found"):
        next(read_frames(path))


def test_text_file_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(MediaError) as err:
        probe(path)
    assert_one_line_naming(err, path)
    with pytest.raises(MediaError):
        next(read_frames(path))


def test_truncated_sample(sample_video: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.mp4"
    data = sample_video.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.3)])
    with pytest.raises(MediaError, match="truncated or corrupt") as err:
        probe(path)
    assert_one_line_naming(err, path)
    with pytest.raises(MediaError, match="truncated or corrupt"):
        list(read_frames(path))


def test_corrupt_middle_fails_during_read_with_frame_index(
    sample_video: Path, tmp_path: Path
) -> None:
    path = tmp_path / "holed.mp4"
    data = bytearray(sample_video.read_bytes())
    third = len(data) // 3
    data[third : third + len(data) // 6] = bytes(len(data) // 6)
    path.write_bytes(bytes(data))
    reached = []
    with pytest.raises(MediaError, match=r"decoding failed at frame \d+") as err:
        for frame in read_frames(path):
            reached.append(frame.index)
    assert_one_line_naming(err, path)
    assert reached and f"frame {len(reached)}" in str(err.value)


def test_truncated_with_index_at_front(make_video: MakeVideo, tmp_path: Path) -> None:
    # moov before mdat: the file still opens and demuxes "cleanly", it just ends early.
    src = make_video("fs.mp4", frames=20, faststart=True)
    path = tmp_path / "fs_cut.mp4"
    data = src.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(MediaError, match=r"only \d+ of 20 video frames") as err:
        probe(path)
    assert_one_line_naming(err, path)
    with pytest.raises(MediaError, match="truncated"):
        list(read_frames(path))


def test_zero_frame_videos(tmp_path: Path) -> None:
    for name, codec in [("zero.avi", "mpeg4"), ("zero.mp4", "libx264")]:
        path = tmp_path / name
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream(codec, rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            container.start_encoding()
        with pytest.raises(MediaError, match="no frames") as err:
            probe(path)
        assert_one_line_naming(err, path)
