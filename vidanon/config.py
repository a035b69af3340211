"""Settings: YAML presets under ``configs/`` layered with command-line overrides.

Presets are partial: ``cctv.yaml`` only says what differs from ``default.yaml``.  Everything
that recovery needs is copied into the sidecar, so a later change of preset cannot break it.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vidanon.errors import VidanonError

# --- schema --------------------------------------------------------------------------------
# Checked when settings are loaded, so a bad value is one clear line before any work (and
# before any key is written), not a traceback from deep inside torch or the encoder.

_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                 "slower", "veryslow", "placebo")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DetectSettings(_Section):
    score_threshold: float = Field(gt=0, le=1)
    scale: float = Field(gt=0, le=8)


class TrackSettings(_Section):
    lost_buffer_s: float = Field(ge=0)
    max_gap: int = Field(ge=0)
    pad: int = Field(ge=0)
    smooth: int = Field(default=7, ge=0)
    cut_threshold: float = Field(default=0.0, ge=0, le=255)
    cut_hist: float = Field(default=0.3, ge=0, le=1)


class FaceSettings(_Section):
    min_eye_px: float = Field(ge=0)
    feather: float = Field(ge=0, le=0.5)
    # Default "oval" for settings written before region masks (old sidecars recover as made).
    mask: Literal["face", "keep-eyes", "keep-mouth", "oval"] = "oval"


class DiffusionSettings(_Section):
    steps: int = Field(ge=1, le=1000)
    refine: int = Field(ge=0, le=1000)
    tol: float = Field(default=0.0, ge=0)
    strength: float | None = Field(default=None, gt=0, le=1)
    temperature: float | None = Field(default=None, gt=0, le=1)
    anchor: float | None = Field(default=None, ge=0, lt=1)
    keep_mean: float | None = Field(default=None, ge=0, le=1)
    frame_fit: int = Field(default=0, ge=0, le=1000)
    batch_size: int = Field(ge=1, le=4096)


class EncodeSettings(_Section):
    lossless: bool
    codec: str
    crf: int = Field(ge=0, le=63)
    preset: Literal[_X264_PRESETS]  # type: ignore[valid-type]
    pix_fmt: str = "yuv420p"

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, v: str) -> str:
        import av

        if v not in av.codecs_available:
            raise ValueError(f"no encoder named {v!r} in this FFmpeg build")
        return v

    @field_validator("pix_fmt")
    @classmethod
    def _known_pix_fmt(cls, v: str) -> str:
        import av

        try:
            av.VideoFormat(v)
        except (ValueError, TypeError):
            raise ValueError(f"unknown pixel format {v!r}") from None
        return v


class GuardSettings(_Section):
    verify: bool = True
    threshold: float | None = Field(default=None, gt=0, lt=1)
    blur_floor: bool = True
    mask_grow: float = Field(default=1.2, ge=1, le=2)


class Settings(_Section):
    model: str | None = None
    guard: GuardSettings = GuardSettings()
    detect: DetectSettings
    track: TrackSettings
    faces: FaceSettings
    diffusion: DiffusionSettings
    encode: EncodeSettings


def validate_settings(settings: dict) -> dict:
    """The settings as checked by the schema (same dict shape), or one-line VidanonError."""
    try:
        return Settings.model_validate(settings).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        raise VidanonError(f"invalid setting {where}: {msg}{shown}") from None


def _load_yaml(text: str, where: str) -> dict:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise VidanonError(f"{where} is not valid YAML{at}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise VidanonError(f"{where} must be a mapping of sections (detect:, diffusion:, ...), "
                           f"not a {type(doc).__name__}")
    return doc


def _preset_text(name: str) -> str:
    try:
        return resources.files("vidanon.configs").joinpath(f"{name}.yaml").read_text()
    except FileNotFoundError:
        raise VidanonError(f"no preset named {name!r} (try default, cctv, fast)") from None


def _merge(base: dict, extra: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        if k not in out:
            raise VidanonError(f"unknown setting {where}{k!r}")
        if isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise VidanonError(f"setting {where}{k} must be a section")
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def _parse_value(text: str, item: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise VidanonError(f"override {item!r}: cannot parse the value") from None


def load_settings(config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Default preset, then a preset name or YAML file, then ``section.key=value`` overrides."""
    settings = _load_yaml(_preset_text("default"), "preset default")
    if config:
        p = Path(config)
        if p.suffix in (".yaml", ".yml") or p.exists():
            if not p.is_file():
                raise VidanonError(f"config file {p} does not exist")
            try:
                text = p.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise VidanonError(f"cannot read config file {p}: {exc}") from None
            extra = _load_yaml(text, f"config file {p}")
        else:
            extra = _load_yaml(_preset_text(str(config)), f"preset {config}")
        settings = _merge(settings, extra)
    for item in overrides or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise VidanonError(f"override {item!r} is not of the form section.key=value")
        path, value = item.split("=", 1)
        tree: dict = {}
        node = tree
        parts = path.strip().split(".")
        for p_ in parts[:-1]:
            node = node.setdefault(p_, {})
        node[parts[-1]] = _parse_value(value, item)
        settings = _merge(settings, tree)
    return validate_settings(settings)
