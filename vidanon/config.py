"""Settings: YAML presets under ``configs/`` layered with command-line overrides.

Presets are partial: ``cctv.yaml`` only says what differs from ``default.yaml``.  Everything
that recovery needs is copied into the sidecar, so a later change of preset cannot break it.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import yaml

from vidanon.errors import VidanonError


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


def _parse_value(text: str):
    return yaml.safe_load(text)


def load_settings(config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Default preset, then a preset name or YAML file, then ``section.key=value`` overrides."""
    settings = yaml.safe_load(_preset_text("default"))
    if config:
        p = Path(config)
        if p.suffix in (".yaml", ".yml") or p.exists():
            if not p.exists():
                raise VidanonError(f"config file {p} does not exist")
            extra = yaml.safe_load(p.read_text()) or {}
        else:
            extra = yaml.safe_load(_preset_text(str(config))) or {}
        settings = _merge(settings, extra)
    for item in overrides or []:
        if "=" not in item:
            raise VidanonError(f"override {item!r} is not of the form section.key=value")
        path, value = item.split("=", 1)
        tree: dict = {}
        node = tree
        parts = path.strip().split(".")
        for p_ in parts[:-1]:
            node = node.setdefault(p_, {})
        node[parts[-1]] = _parse_value(value)
        settings = _merge(settings, tree)
    return settings
