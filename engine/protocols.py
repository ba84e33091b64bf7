"""What the evaluation protocols (``linprobe``, ``finetune``) share: their settings from a preset plus
``section.key=value`` overrides, and the folder their results go to."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sslpt.engine.config import ConfigError, _override, _update


def protocol_settings(settings_cls, presets: dict, preset: str | None, default_preset: str, overrides, section: str):
    """(settings from ``presets[preset]`` and the ``section.key=value`` overrides, the remaining overrides)."""
    name = preset or default_preset
    if name not in presets:
        raise ConfigError(f"--preset must be one of {', '.join(presets)}, got {name!r}")
    settings = settings_cls(**presets[name])
    own, rest = [], []
    for item in overrides:
        (own if item.strip().startswith(f"{section}.") else rest).append(item)
    for item in own:
        _update(settings, _override(item)[section], f"{section}.")
    settings.check()
    return settings, rest


def output_dir(args, name: str) -> Path:
    if args.run_dir is not None:
        return Path(args.run_dir)
    base = Path(args.source) if Path(args.source).is_dir() else Path("runs")
    tag = "random" if args.random_init else "pretrained"
    return base / f"{name}-{tag}-{datetime.now():%Y%m%d-%H%M%S}"
