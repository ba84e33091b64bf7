"""Typed run configuration: dataclasses, TOML presets under configs/, ``--set`` overrides.

Every check fails before training starts with a message naming the field, e.g.
``objective.mask_ratio must be in [0, 1), got 1.2``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

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


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "vit_base"
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
    attn_backend: str = "auto"      # attention: auto | ours | sdpa | flex | xformers | reference

    @property
    def dims(self) -> tuple[int, int, int]:
        width, depth, heads = VIT_ARCHS[self.arch]
        return (self.embed_dim or width, self.depth or depth, self.num_heads or heads)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.in_chans


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: str = "hpm"
    mask_ratio: float = 0.75
    norm_pix: bool = False          # HPM's released scripts reconstruct raw (standardised) pixels
    # HPM (OBJECTIVES.md section 2)
    alpha_T: float = 0.5            # final fraction of the masked set chosen as hard patches
    rec_weight: float = 1.0
    pred_weight: float = 1.0
    relative: bool = True           # False: the paper's ablation, MSE to per-image standardised losses
    stable_relative: bool = True    # False: the official log(sigmoid + 1e-6) form
    ema_decay_start: float = 0.999
    ema_decay_end: float = 0.9999
    ema_ramp_epochs: int = 100      # shortened to the run's length for runs under 100 epochs
    # contrastive: SimCLR and MoCo v3 (objectives/simclr.py, mocov3.py); defaults are MoCo v3's ViT recipe
    temperature: float = 0.2
    pooling: str = "cls"            # encoder feature fed to the heads: "cls" token or "mean" of patch tokens
    proj_layers: int = 3            # projector: Linear-BN-ReLU x (layers - 1), Linear, BN without affine
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096         # MoCo v3's 2-layer predictor
    momentum: float = 0.99          # MoCo v3's momentum encoder: cosine from this to 1 (momentum_cosine)
    momentum_cosine: bool = True
    stop_grad_patch_embed: bool = False  # MoCo v3's frozen random patch projection (stabilises ViT training)
    # the two views (engine/data/views.py); the data pipeline's own crop should be off: data.crop_scale = [1, 1]
    view_crop_scale: tuple[float, float] = (0.08, 1.0)
    view_hflip: float = 0.5
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2     # 3-channel images only
    blur_prob: tuple[float, float] = (1.0, 0.1)       # per view (BYOL / MoCo v3: asymmetric)
    blur_sigma: tuple[float, float] = (0.1, 2.0)      # pixels
    solarize_prob: tuple[float, float] = (0.0, 0.2)   # per view


@dataclass(kw_only=True)
class DataConfig:
    name: str = "digits"            # digits | folder | synthetic
    path: str = ""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    val_fraction: float = 0.2
    num_workers: int = 0
    synthetic_size: int = 2048


@dataclass(kw_only=True)
class OptimConfig:
    blr: float = 1.5e-4             # lr = blr * effective batch / 256
    lr: float | None = None         # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: float | None = None  # global-norm clipping; None = off (MAE, HPM)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 800
    batch_size: int = 64            # per device
    accum_steps: int = 1
    precision: str = "bf16"         # bf16 | fp16 | fp32
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    seed: int = 0
    cpu_threads: int = 0            # intra-op threads when training on the CPU; 0 = PyTorch's default
    backend: str = "auto"           # kernels backend: auto | reference | triton | cuda
    out_dir: str = "runs"
    run_name: str = ""              # default: <objective>-<data>-<timestamp>
    log_every: int = 10             # steps between progress/metric lines
    eval_every: int = 0             # epochs between evaluations (pictures, rank correlation), plus one after epoch 1; 0 = at the end only
    save_every: int = 1             # epochs between checkpoints
    save_every_steps: int = 0       # also checkpoint every N steps (mid-epoch, exact resume); 0 = epoch ends only
    keep_checkpoints: int = 2       # newest complete checkpoints kept; >= 2 (the newest may be mid-replacement)
    # scale-out (issue 7): under torchrun, one process per device
    parallel: str = "none"          # none | ddp | fsdp (FSDP2 fully_shard per transformer block, then the root)
    reshard_after_forward: bool = True  # fsdp: free gathered block parameters after forward (re-gather in backward)
    activation_checkpointing: bool = False  # recompute each trainable block in backward instead of storing it
    compile: bool = False           # torch.compile each transformer block (fullgraph, static shapes)
    compile_backend: str = "inductor"
    nonfinite: str = "skip"         # skip | fail: a step with non-finite gradients is never applied
    max_consecutive_skips: int = 25  # skip: stop after this many skipped steps in a row
    deterministic: bool = False     # deterministic algorithms (bit-exact resume on CPU; slower on GPU)
    dist_timeout_s: int = 600       # rendezvous and collective timeout
    probe: bool = True              # linear probe (pre-trained vs random encoder) at the end
    probe_max_images: int = 10000
    probe_shots: int = 5            # also a linear probe fitted on this many labels per class (mean of 20 draws); 0 = off


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        validate(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and overrides

def _coerce(path: str, value, annotation):
    """Check ``value`` against a field's annotation; ints are accepted for floats."""
    ann = annotation
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is tuple:
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


def _update(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {path}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section: give it as [{path}] or {path}.<key>=...")
            _update(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


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


def load_config(name: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset/file <- ``section.key=value`` overrides, then validated."""
    cfg = Config()
    if name is not None:
        path = resolve_config_path(name)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
        _update(cfg, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_value(text.strip())
        _update(cfg, nested)
    return cfg.validate()


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values are omitted: they are the defaults)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (list, tuple)):
                text = "[" + ", ".join(json.dumps(v) for v in value) + "]"
            else:
                text = json.dumps(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- validation

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_contrastive(o: ObjectiveConfig) -> None:
    _require(o.temperature > 0, f"objective.temperature must be > 0, got {o.temperature}")
    _require(o.pooling in ("cls", "mean"), f"objective.pooling must be 'cls' or 'mean', got {o.pooling!r}")
    for name in ("proj_layers", "proj_hidden", "proj_dim", "pred_hidden"):
        _require(getattr(o, name) >= 1, f"objective.{name} must be >= 1, got {getattr(o, name)}")
    _require(0.0 <= o.momentum <= 1.0, f"objective.momentum must be in [0, 1], got {o.momentum}")
    lo, hi = o.view_crop_scale
    _require(0 < lo <= hi <= 1, f"objective.view_crop_scale must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
    for name in ("view_hflip", "jitter_prob", "grayscale_prob"):
        value = getattr(o, name)
        _require(0 <= value <= 1, f"objective.{name} must be a probability in [0, 1], got {value}")
    for name in ("blur_prob", "solarize_prob"):
        _require(all(0 <= p <= 1 for p in getattr(o, name)),
                 f"objective.{name} must be two probabilities in [0, 1], got {list(getattr(o, name))}")
    _require(all(v >= 0 for v in o.jitter[:3]) and 0 <= o.jitter[3] <= 0.5,
             f"objective.jitter (brightness, contrast, saturation, hue) must be >= 0 with hue <= 0.5, "
             f"got {list(o.jitter)}")
    lo, hi = o.blur_sigma
    _require(0 < lo <= hi, f"objective.blur_sigma must satisfy 0 < min <= max, got {[lo, hi]}")


def validate(cfg: Config) -> None:
    from kernels import ATTENTION_BACKENDS, BACKENDS  # the engine depends on kernels, never the reverse

    m, o, d, opt, t = cfg.model, cfg.objective, cfg.data, cfg.optim, cfg.train
    _require(m.arch in VIT_ARCHS, f"model.arch must be one of {sorted(VIT_ARCHS)}, got {m.arch!r}")
    for name in ("img_size", "patch_size", "in_chans", "decoder_dim", "decoder_depth", "decoder_heads"):
        _require(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    for name in ("embed_dim", "depth", "num_heads"):
        value = getattr(m, name)
        _require(value is None or value >= 1, f"model.{name} must be >= 1, got {value}")
    _require(m.img_size % m.patch_size == 0,
             f"model.patch_size={m.patch_size} must divide model.img_size={m.img_size}")
    width, _, heads = m.dims
    _require(width % heads == 0, f"model.embed_dim={width} must be divisible by model.num_heads={heads}")
    _require(m.decoder_dim % m.decoder_heads == 0,
             f"model.decoder_dim={m.decoder_dim} must be divisible by model.decoder_heads={m.decoder_heads}")
    _require(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    _require(m.attn_backend in ATTENTION_BACKENDS,
             f"model.attn_backend must be one of {ATTENTION_BACKENDS}, got {m.attn_backend!r}")

    from engine.objectives import OBJECTIVES
    _require(o.name in OBJECTIVES, f"objective.name must be one of {sorted(OBJECTIVES)}, got {o.name!r}")
    _require(0.0 <= o.mask_ratio < 1.0, f"objective.mask_ratio must be in [0, 1), got {o.mask_ratio}")
    keep = int(m.num_patches * (1 - o.mask_ratio))
    _require(keep >= 1, f"objective.mask_ratio={o.mask_ratio} leaves no visible patch of {m.num_patches}")
    _require(not o.norm_pix or m.patch_dim >= 2,
             "objective.norm_pix needs at least 2 values per patch (model.patch_size**2 * in_chans)")
    _require(0.0 <= o.alpha_T <= 1.0, f"objective.alpha_T must be in [0, 1], got {o.alpha_T}")
    _require(o.rec_weight >= 0 and o.pred_weight >= 0, "objective.rec_weight and pred_weight must be >= 0")
    for name in ("ema_decay_start", "ema_decay_end"):
        value = getattr(o, name)
        _require(0.0 <= value < 1.0, f"objective.{name} must be in [0, 1), got {value}")
    _require(o.ema_ramp_epochs >= 0, f"objective.ema_ramp_epochs must be >= 0, got {o.ema_ramp_epochs}")
    _validate_contrastive(o)

    _require(d.name in ("digits", "folder", "synthetic"),
             f"data.name must be one of digits, folder, synthetic; got {d.name!r}")
    _require(d.name != "folder" or bool(d.path), "data.path must name an image folder when data.name = 'folder'")
    lo, hi = d.crop_scale
    _require(0 < lo <= hi <= 1, f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(d.crop_scale)}")
    _require(0 <= d.hflip <= 1, f"data.hflip must be a probability in [0, 1], got {d.hflip}")
    _require(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _require(d.synthetic_size >= 1, f"data.synthetic_size must be >= 1, got {d.synthetic_size}")

    _require(opt.blr > 0, f"optim.blr must be > 0, got {opt.blr}")
    _require(opt.lr is None or opt.lr > 0, f"optim.lr must be > 0, got {opt.lr}")
    _require(opt.min_lr >= 0, f"optim.min_lr must be >= 0, got {opt.min_lr}")
    _require(opt.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {opt.weight_decay}")
    _require(all(0 <= b < 1 for b in opt.betas), f"optim.betas must be in [0, 1), got {list(opt.betas)}")
    _require(opt.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {opt.warmup_epochs}")
    _require(opt.clip_grad is None or opt.clip_grad > 0, f"optim.clip_grad must be > 0, got {opt.clip_grad}")

    _require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _require(t.accum_steps >= 1, f"train.accum_steps must be >= 1, got {t.accum_steps}")
    _require(t.precision in ("bf16", "fp16", "fp32"), f"train.precision must be bf16, fp16 or fp32, got {t.precision!r}")
    _require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
             f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _require(t.backend in BACKENDS, f"train.backend must be one of {BACKENDS}, got {t.backend!r}")
    _require(t.cpu_threads >= 0, f"train.cpu_threads must be >= 0, got {t.cpu_threads}")
    _require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _require(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    _require(t.probe_shots >= 0, f"train.probe_shots must be >= 0 (0 = no few-label probe), got {t.probe_shots}")
    _require(t.save_every >= 1, f"train.save_every must be >= 1, got {t.save_every}")
    _require(t.keep_checkpoints >= 2, f"train.keep_checkpoints must be >= 2 (the newest checkpoint may be the one "
             f"being replaced when a run dies), got {t.keep_checkpoints}")
    _require(t.save_every_steps >= 0, f"train.save_every_steps must be >= 0, got {t.save_every_steps}")
    _require(t.parallel in ("none", "ddp", "fsdp"), f"train.parallel must be none, ddp or fsdp, got {t.parallel!r}")
    _require(bool(t.compile_backend), "train.compile_backend must name a torch.compile backend, e.g. 'inductor'")
    _require(t.nonfinite in ("skip", "fail"), f"train.nonfinite must be skip or fail, got {t.nonfinite!r}")
    _require(t.max_consecutive_skips >= 1, f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
    _require(t.dist_timeout_s >= 1, f"train.dist_timeout_s must be >= 1 (seconds), got {t.dist_timeout_s}")
