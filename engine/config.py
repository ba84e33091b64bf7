"""Typed run configuration: dataclasses, TOML presets under configs/, ``--set`` overrides.

Every check fails before training starts with a message naming the field, e.g.
``objective.hpm.mask_ratio must be in [0, 1), got 1.2``. Each objective declares its own section
(``[objective.hpm]``, ...) as a dataclass; this module knows none of their fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from sslpt.engine import registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# encoder presets: (width, depth, heads); MAE/timm ViT-{Ti,S,B,L,H}
VIT_ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}
# ResNet encoders (engine/models/resnet.py), torchvision's layouts; the ViT-only model fields do not apply to them
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "vit_base"          # a VIT_ARCHS or RESNET_ARCHS name
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int | None = None   # None: from arch
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    attn_backend: str = "auto"      # attention backend of every encoder and decoder: kernels.ATTENTION_BACKENDS
    # ResNets only: "imagenet" = 7x7 stride-2 conv + max-pool; "small" = 3x3 stride-1 conv, no pool (tiny images)
    resnet_stem: Literal["imagenet", "small"] = "imagenet"
    # ResNets only: the first stage's width (stages w, 2w, 4w, 8w); 64 = torchvision's / timm's, the only width
    # `export` can name; smaller ones make CPU-sized runs (width 16: ~1/16 of the FLOPs)
    resnet_width: int = 64

    @property
    def dims(self) -> tuple[int, int, int]:
        """The ViT's (width, depth, heads)."""
        if self.arch not in VIT_ARCHS:
            raise ConfigError(f"model.arch={self.arch!r} is not a ViT: it has no (width, depth, heads)")
        width, depth, heads = VIT_ARCHS[self.arch]
        return (self.embed_dim or width, self.depth or depth, self.num_heads or heads)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.in_chans


@dataclass(kw_only=True)
class ObjectiveSettings:
    """Base of every objective's config section, ``[objective.<name>]``; the objective declares the subclass.

    Choice fields are ``Literal[...]`` (checked by the loader); ``check`` adds range and cross-section checks
    and names fields with ``self.key(field)``, e.g. ``objective.hpm.alpha_T``.
    """
    objective: ClassVar[str] = ""   # set by engine.registry.register

    @property
    def name(self) -> str:
        return self.objective

    def key(self, field_name: str) -> str:
        return f"objective.{self.objective}.{field_name}"

    def check(self, cfg: "Config") -> None:
        """Raise ConfigError (via ``require``) for a value the objective cannot train with."""


@dataclass(kw_only=True)
class DataConfig:
    name: Literal["digits", "folder", "synthetic", "webdataset"] = "digits"
    path: str = ""                  # folder: the image folder; webdataset: a shard folder or shard-{000..099}.tar
    decoder: Literal["auto", "pil", "turbojpeg"] = "auto"   # JPEG decoding; auto: turbojpeg if installed
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    val_fraction: float = 0.2
    num_workers: int = 0
    synthetic_size: int = 2048
    max_image_pixels: int = 89_478_485   # folder: larger images are skipped (decompression bombs); PIL's default


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"   # sgd: momentum SGD (the ResNet recipes of DINO, DenseCL)
    sgd_momentum: float = 0.9       # optim.name = "sgd" only
    blr: float = 1.5e-4             # lr = blr * effective batch / 256
    lr: float | None = None         # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine per iteration from weight_decay to this (DINO); None: constant
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: float | None = None  # global-norm clipping; None = off (MAE, HPM)
    clip_mode: Literal["global", "per_param"] = "global"  # per_param: each parameter's grad norm clipped separately (DINO, DropPos)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 800
    batch_size: int = 64            # per device
    accum_steps: int = 1
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    seed: int = 0
    cpu_threads: int = 0            # intra-op threads when training on the CPU; 0 = PyTorch's default
    backend: Literal["auto", "reference", "triton", "cuda"] = "auto"   # kernels backend (kernels.set_backend)
    out_dir: str = "runs"
    run_name: str = ""              # default: <objective>-<data>-<timestamp>
    log_every: int = 10             # steps between progress/metric lines
    eval_every: int = 0             # epochs between evaluations (pictures, rank correlation), plus one after epoch 1; 0 = at the end only
    save_every: int = 1             # epochs between checkpoints
    save_every_steps: int = 0       # also checkpoint every N steps (mid-epoch, exact resume); 0 = epoch ends only
    keep_checkpoints: int = 2       # newest complete checkpoints kept; >= 2 (the newest may be mid-replacement)
    # scale-out: under torchrun, one process per device
    parallel: Literal["none", "ddp", "fsdp"] = "none"  # fsdp: FSDP2 fully_shard per transformer block, then the root
    reshard_after_forward: bool = True  # fsdp: free gathered block parameters after forward (re-gather in backward)
    activation_checkpointing: bool = False  # recompute each trainable block in backward instead of storing it
    compile: bool = False           # torch.compile each transformer block (fullgraph, static shapes)
    compile_backend: str = "inductor"
    nonfinite: Literal["skip", "fail"] = "skip"  # a step with non-finite gradients is never applied; fail: stop
    max_consecutive_skips: int = 25  # skip: stop after this many skipped steps in a row
    deterministic: bool = False     # deterministic algorithms (bit-exact resume on CPU; slower on GPU)
    dist_timeout_s: int = 600       # rendezvous and collective timeout
    probe: bool = True              # linear probe (pre-trained vs random encoder) at the end
    probe_max_images: int = 10000
    probe_shots: int = 5            # also a linear probe fitted on this many labels per class (mean of 20 draws); 0 = off
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl",)  # metrics.jsonl is always written


@dataclass(kw_only=True)
class Config:
    """A run's configuration. ``objective`` is the selected objective's own settings dataclass (its class
    comes from the registry); ``plugins`` are files or modules imported first, to register objectives that
    live outside this package."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveSettings = field(default_factory=lambda: registry.get("hpm").Settings())
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plugins: tuple[str, ...] = ()

    def validate(self) -> "Config":
        validate(self)
        return self

    def to_dict(self) -> dict:
        """Plain values, laid out as the TOML file is: ``objective = {"name": ..., <name>: {...}}``."""
        out = dataclasses.asdict(self)
        out["objective"] = {"name": self.objective.name, self.objective.name: dataclasses.asdict(self.objective)}
        return out


SECTIONS = ("model", "objective", "data", "optim", "train")


# ---------------------------------------------------------------- loading and overrides

def _coerce(path: str, value, annotation):
    """Check ``value`` against a field's annotation; ints are accepted for floats."""
    ann = annotation
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{path} must be a list, got {value!r}")
            return tuple(_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if ann is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if ann is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if ann is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if ann is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {ann} for {path}")


def _unknown_key(path: str, key: str, names: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
    return ConfigError(f"unknown config key {path}{hint}")


def _update(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(path, key, names, prefix)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section: give it as [{path}] or {path}.<key>=...")
            _update(current, value, f"{path}.")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{path} is a value, not a section")
            setattr(obj, key, _coerce(path, value, hints[key]))


def _objective_settings(table: dict) -> ObjectiveSettings:
    """``[objective]`` holds ``name`` and one section, ``[objective.<name>]``, for that objective only."""
    table = dict(table)
    name = _coerce("objective.name", table.pop("name", "hpm"), str)
    try:
        cls = registry.get(name)
    except registry.UnknownObjective as err:
        raise ConfigError(err.args[0]) from None
    settings = cls.Settings()
    own = [f.name for f in dataclasses.fields(settings)]
    for key, value in table.items():
        if key == name:
            continue
        if key in registry.names():
            raise ConfigError(f"[objective.{key}] configures objective {key!r}, but objective.name = {name!r}: "
                              f"remove that section or set objective.name = {key!r}")
        if key in own:
            raise ConfigError(f"unknown config key objective.{key}: objective settings live in their objective's "
                              f"section, objective.{name}.{key} ([objective.{name}] in a file)")
        raise _unknown_key(f"objective.{key}", key, ["name", *registry.names()], "objective.")
    section = table.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"objective.{name} is a section: give it as [objective.{name}] or "
                          f"objective.{name}.<key>=...")
    _update(settings, section, f"objective.{name}.")
    return settings


def _merge(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _parse_value(text: str):
    """A --set value: a TOML literal (1e-3, true, [0.2, 1.0], "x"), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_config_path(name: str | Path) -> Path:
    """A file path, or the name of a preset in configs/ (with or without .toml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name}", CONFIG_DIR / f"{name}.toml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"config {str(name)!r} is neither a file nor a preset (presets: {presets})")


def _override(item: str) -> dict:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = _parse_value(text.strip())
    return nested


def _load_plugins(specs, base_dir: Path | None) -> tuple[str, ...]:
    """Import each plugin; file paths are stored absolute so a resumed run finds them from anywhere."""
    specs = _coerce("plugins", specs, tuple[str, ...])
    stored = []
    for spec in specs:
        try:
            registry.load_plugin(spec, base_dir)
        except (ImportError, FileNotFoundError) as err:
            raise ConfigError(f"plugins: cannot import {spec!r}: {err}") from err
        if spec.endswith(".py") and not Path(spec).is_absolute() and base_dir is not None:
            spec = str((base_dir / spec).resolve())
        stored.append(spec)
    return tuple(stored)


def load_config(name: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset/file <- ``section.key=value`` overrides, then validated."""
    raw: dict = {}
    base_dir = None
    if name is not None:
        path = resolve_config_path(name)
        base_dir = path.resolve().parent
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
    for item in overrides:
        _merge(raw, _override(item))
    cfg = Config(plugins=_load_plugins(raw.pop("plugins", ()), base_dir))
    cfg.objective = _objective_settings(raw.pop("objective", {}) or {})
    for key in raw:
        if key not in SECTIONS:
            raise _unknown_key(key, key, [*SECTIONS, "plugins"], "")
        if not isinstance(raw[key], dict):
            raise ConfigError(f"{key} is a section: give it as [{key}] or {key}.<key>=...")
    _update(cfg, raw)
    return cfg.validate()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values are omitted: they are the defaults)."""
    data = cfg.to_dict()
    lines = [f"plugins = {_toml_value(data.pop('plugins'))}", ""] if cfg.plugins else []
    objective = data.pop("objective")
    name = objective["name"]
    tables = [(section, data[section]) for section in ("model",)]
    tables += [("objective", {"name": name}), (f"objective.{name}", objective[name])]
    tables += [(section, data[section]) for section in ("data", "optim", "train")]
    for title, values in tables:
        lines.append(f"[{title}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- validation

def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``: the one way checks report a bad value."""
    if not ok:
        raise ConfigError(message)


def require_probability(value: float, path: str) -> None:
    require(0 <= value <= 1, f"{path} must be a probability in [0, 1], got {value}")


def require_range(pair, path: str, upper: float | None = 1.0) -> None:
    """A (min, max) pair with 0 < min <= max (<= upper)."""
    lo, hi = pair
    bound = "" if upper is None else f" <= {upper:g}"
    require(0 < lo <= hi and (upper is None or hi <= upper),
            f"{path} must satisfy 0 < min <= max{bound}, got {list(pair)}")


def is_resnet(model: ModelConfig) -> bool:
    """Whether ``model.arch`` names a ResNet (else a ViT)."""
    return model.arch in RESNET_ARCHS


def require_vit(cfg: Config, objective_name: str) -> None:
    """For objectives built on the ViT's patch tokens: a clear error when ``model.arch`` is a ResNet."""
    require(not is_resnet(cfg.model), f"objective {objective_name!r} needs a ViT encoder (it works on patch tokens), "
            f"but model.arch={cfg.model.arch!r} is a ResNet: choose one of {', '.join(VIT_ARCHS)}")


def validate(cfg: Config) -> None:
    m, d, opt, t = cfg.model, cfg.data, cfg.optim, cfg.train
    archs = (*VIT_ARCHS, *RESNET_ARCHS)
    close = difflib.get_close_matches(m.arch, archs, n=1)
    require(m.arch in archs, f"model.arch must be one of {', '.join(archs)}, got {m.arch!r}"
            + (f" (did you mean {close[0]!r}?)" if close else ""))
    for name in ("img_size", "in_chans"):
        require(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    require(isinstance(m.resnet_width, int) and not isinstance(m.resnet_width, bool) and m.resnet_width >= 1,
            f"model.resnet_width must be an integer >= 1 (64: torchvision's ResNets), got {m.resnet_width!r}")
    require(is_resnet(m) or m.resnet_width == 64, f"model.resnet_width={m.resnet_width} applies to ResNets only; "
            f"model.arch={m.arch!r} is a ViT")
    if is_resnet(m):
        _validate_resnet(cfg)
    else:
        _validate_vit(m)

    require(d.name != "folder" or bool(d.path), "data.path must name an image folder when data.name = 'folder'")
    require(d.name != "webdataset" or bool(d.path), "data.path must name a folder of tar shards (or a pattern such "
            "as shard-{000000..000099}.tar) when data.name = 'webdataset'")
    if d.name in ("folder", "webdataset"):
        from sslpt.engine.data.decode import resolve_decoder

        try:
            resolve_decoder(d.decoder)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    require_range(d.crop_scale, "data.crop_scale")
    require_probability(d.hflip, "data.hflip")
    require(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    require(d.synthetic_size >= 1, f"data.synthetic_size must be >= 1, got {d.synthetic_size}")
    require(d.max_image_pixels >= 1, f"data.max_image_pixels must be >= 1, got {d.max_image_pixels}")
    if d.name in ("digits", "folder", "webdataset"):
        require(m.in_chans in (1, 3), f"model.in_chans={m.in_chans} does not fit data.name={d.name!r}: its images "
                f"are grayscale (in_chans=1) or RGB (in_chans=3)")
    if d.name == "digits":
        require(m.img_size >= 8, f"model.img_size={m.img_size} is smaller than the 8x8 digits images: set "
                f"model.img_size >= 8 (they are upsampled)")

    for name in ("blr", "lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad"):
        value = getattr(opt, name)
        require(value is None or math.isfinite(value), f"optim.{name} must be a finite number, got {value}")
    require(opt.blr > 0, f"optim.blr must be > 0, got {opt.blr}")
    require(opt.lr is None or opt.lr > 0, f"optim.lr must be > 0, got {opt.lr}")
    require(opt.min_lr >= 0, f"optim.min_lr must be >= 0, got {opt.min_lr}")
    require(opt.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {opt.weight_decay}")
    require(0 <= opt.sgd_momentum < 1, f"optim.sgd_momentum must be in [0, 1), got {opt.sgd_momentum}")
    require(opt.weight_decay_end is None or opt.weight_decay_end >= 0,
            f"optim.weight_decay_end must be >= 0 (or absent: constant weight decay), got {opt.weight_decay_end}")
    require(all(0 <= b < 1 for b in opt.betas), f"optim.betas must be in [0, 1), got {list(opt.betas)}")
    require(opt.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {opt.warmup_epochs}")
    require(opt.clip_grad is None or opt.clip_grad > 0, f"optim.clip_grad must be > 0, got {opt.clip_grad}")
    require(opt.clip_mode == "global" or opt.clip_grad is not None,
            f"optim.clip_mode = {opt.clip_mode!r} needs a threshold: set optim.clip_grad")

    require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    require(t.accum_steps >= 1, f"train.accum_steps must be >= 1, got {t.accum_steps}")
    require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
            f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    require(t.cpu_threads >= 0, f"train.cpu_threads must be >= 0, got {t.cpu_threads}")
    require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    require(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    require(t.probe_shots >= 0, f"train.probe_shots must be >= 0 (0 = no few-label probe), got {t.probe_shots}")
    require(t.save_every >= 1, f"train.save_every must be >= 1, got {t.save_every}")
    require(t.keep_checkpoints >= 2, f"train.keep_checkpoints must be >= 2 (the newest checkpoint may be the one "
            f"being replaced when a run dies), got {t.keep_checkpoints}")
    require(t.save_every_steps >= 0, f"train.save_every_steps must be >= 0, got {t.save_every_steps}")
    require(bool(t.compile_backend), "train.compile_backend must name a torch.compile backend, e.g. 'inductor'")
    require(t.max_consecutive_skips >= 1, f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
    require(t.dist_timeout_s >= 1, f"train.dist_timeout_s must be >= 1 (seconds), got {t.dist_timeout_s}")
    from sslpt.engine.run_dir import check_run_name

    why = check_run_name(t.run_name) if t.run_name else None
    require(why is None, f"train.run_name={t.run_name!r} {why}: it must name a folder inside train.out_dir "
            f"(use --run-dir for a folder elsewhere)")

    cfg.objective.check(cfg)


def _validate_resnet(cfg: Config) -> None:
    """The ViT-only model fields (patch size, width, depth, heads, decoder, attention) are ignored for ResNets.
    The scale-out wrappers work per transformer block, which a ResNet has none of: refuse them rather than
    silently shard it as one unit, or checkpoint or compile nothing."""
    t, arch = cfg.train, cfg.model.arch
    require(t.parallel != "fsdp", f"train.parallel='fsdp' shards per transformer block and model.arch={arch!r} is "
            f"a ResNet: use train.parallel='ddp' (its weights fit every device; BatchNorms sync across GPUs)")
    require(not t.activation_checkpointing, f"train.activation_checkpointing recomputes transformer blocks and "
            f"model.arch={arch!r} is a ResNet: set train.activation_checkpointing=false")
    require(not t.compile, f"train.compile compiles transformer blocks and model.arch={arch!r} is a ResNet: set "
            f"train.compile=false")


def _validate_vit(m: ModelConfig) -> None:
    from sslpt.kernels import ATTENTION_BACKENDS   # the engine depends on kernels, never the reverse

    for name in ("patch_size", "decoder_dim", "decoder_depth", "decoder_heads"):
        require(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    for name in ("embed_dim", "depth", "num_heads"):
        value = getattr(m, name)
        require(value is None or value >= 1, f"model.{name} must be >= 1, got {value}")
    require(m.img_size % m.patch_size == 0,
            f"model.patch_size={m.patch_size} must divide model.img_size={m.img_size}")
    width, _, heads = m.dims
    require(width % heads == 0, f"model.embed_dim={width} must be divisible by model.num_heads={heads}")
    require(m.decoder_dim % m.decoder_heads == 0,
            f"model.decoder_dim={m.decoder_dim} must be divisible by model.decoder_heads={m.decoder_heads}")
    require(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    require(m.attn_backend in ATTENTION_BACKENDS,
            f"model.attn_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {m.attn_backend!r}")
