"""A pre-trained encoder from a run folder (its config.toml and newest checkpoint that verifies) or from an
exported safetensors file: what ``probe``, ``export``, ``linprobe`` and ``finetune`` start from."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from sslpt.engine.checkpoint import load_checkpoint, select_checkpoint
from sslpt.engine.config import Config, ConfigError, ObjectiveSettings, _merge, _override, _update, load_config
from sslpt.engine.export import (config_digest, data_normalisation, encoder_from_file, require_library_width,
                                 save_encoder)
from sslpt.engine.models.backbones import build_backbone
from sslpt.engine.models.resnet import ResNet, resnet_arch_name
from sslpt.engine.objectives import build_objective


def load_run(run_dir: Path, overrides=()):
    """(config with ``overrides``, objective with the newest verified checkpoint's weights, checkpoint path)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.toml)")
    cfg = load_config(run_dir / "config.toml", list(overrides))
    path, skipped = select_checkpoint(run_dir)
    for bad, why in skipped:
        print(f"warning: skipped checkpoint {bad.name}: {why}", file=sys.stderr)
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint that verifies in {run_dir / 'checkpoints'}")
    objective = build_objective(cfg)
    load_checkpoint(path, objective, verified=True)   # weights only; DCP gathers the shards of any world size
    return cfg, objective, path


def load_encoder(source: Path, overrides=(), random_init: bool = False):
    """(config, encoder, description) from a run folder or an exported file. For a file, the config is the
    defaults with the file's architecture (``model.*``) and then ``overrides`` (e.g. ``data.*``). ``random_init``:
    the same architecture untrained, built as the probe's baseline is (seeded by train.seed + 1)."""
    source = Path(source)
    if source.is_dir():
        cfg, objective, path = load_run(source, overrides)
        if not random_init:
            return cfg, objective.encoder, f"{source} ({path.name})"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 1)
            return cfg, type(objective).random_encoder(cfg.objective, cfg.model), "random init"
    encoder, meta = encoder_from_file(source)
    shape = _model_fields(encoder, source)
    settings = [f"model.{k}={v}" for k, v in shape.items()] + list(overrides)
    cfg = _objectiveless_config(settings) if isinstance(encoder, ResNet) else load_config(None, settings)
    if not random_init:
        return cfg, encoder, str(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)
        return cfg, build_backbone(cfg.model), "random init"


def _objectiveless_config(overrides: list[str]) -> Config:
    """The defaults with ``overrides``, validated, under no pre-training objective: the default one (HPM) only
    takes ViTs, and an exported encoder is evaluated whatever trained it."""
    raw: dict = {}
    for item in overrides:
        _merge(raw, _override(item))
    cfg = Config(objective=ObjectiveSettings())
    _update(cfg, raw)
    return cfg.validate()


def _model_fields(encoder, source: Path) -> dict:
    """The ``model.*`` settings that build ``encoder``'s architecture."""
    if isinstance(encoder, ResNet):
        arch = resnet_arch_name(encoder)
        if arch is None:
            raise ConfigError(f"{source}: a ResNet with {encoder.block.__name__}s {list(encoder.layers)} is none of "
                              f"the engine's architectures (model.arch)")
        return {"arch": arch, "resnet_stem": encoder.stem, "in_chans": encoder.in_chans,
                **({"img_size": encoder.img_size} if encoder.img_size else {})}
    return {"img_size": encoder.grid * encoder.patch_size, "patch_size": encoder.patch_size,
            "in_chans": encoder.patch_embed.in_channels, "embed_dim": encoder.embed_dim,
            "depth": len(encoder.blocks), "num_heads": encoder.blocks[0].attn.num_heads,
            "mlp_ratio": encoder.blocks[0].mlp.fc1.out_features / encoder.embed_dim}


def export_run(run_dir: Path, out: Path | None = None, fmt: str = "timm", pool: str = "cls",
               overrides=()) -> tuple[Path, dict]:
    """Export the encoder of a run's newest checkpoint that verifies; default ``<run>/export/encoder_<fmt>``."""
    cfg, objective, checkpoint = load_run(Path(run_dir), overrides)
    if isinstance(objective.encoder, ResNet):   # before writing anything; the field the run's config set
        require_library_width(objective.encoder, getattr(objective, "width_field", "model.resnet_width"))
    out = Path(out) if out is not None else Path(run_dir) / "export" / f"encoder_{fmt}.safetensors"
    extra = {"normalisation": data_normalisation(cfg), "config_sha256": config_digest(cfg),
             "objective": cfg.objective.name, "checkpoint": checkpoint.name, "run": str(run_dir)}
    return out, save_encoder(objective.encoder, out, fmt=fmt, pool=pool, extra=extra)
