"""The ``export``, ``linprobe`` and ``finetune`` commands (parsed in engine/cli.py)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path


def protocol_settings(settings_cls, presets: dict, preset: str | None, default_preset: str, overrides, section: str):
    """(settings from ``presets[preset]`` and the ``section.key=value`` overrides, the remaining overrides)."""
    from sslpt.engine.config import ConfigError, _override, _update

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


def run_encoder_command(args) -> int:
    if args.command == "export":
        from sslpt.engine.export import export_run

        out, meta = export_run(args.run_dir, args.out, args.format, args.pool)
        print(f"wrote {out} and {out}.json ({meta['format']} names"
              f"{', timm model ' + meta['timm_model'] if meta['timm_model'] else ''})")
        return 0
    if args.command == "linprobe":
        from sslpt.engine.linprobe import run_linprobe as run
    else:
        from sslpt.engine.finetune import run_finetune as run
    result = run(args)
    if result.pop("is_main", True):   # under torchrun, rank 0 reports
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    return 0
