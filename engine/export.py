"""Weights out and in: the encoder as a safetensors file that timm's ``VisionTransformer`` (or, for a ResNet
encoder, timm's and torchvision's ``ResNet``) loads strictly, and an encoder built from such a file (fine-tuning,
frozen teachers).

Names. Our ViT differs from timm's in one name and one kind of tensor:

- ``patch_embed.{weight,bias}`` (a bare Conv2d here) is ``patch_embed.proj.{weight,bias}`` in timm;
- ``pos_embed`` is a buffer here (MAE's fixed sin-cos table) and a parameter in timm. Both are [1, 1 + N, D] with
  the cls entry first and the patch entries row-major, and both are *added* to the cls token and the patches, so
  the values copy over unchanged.

Blocks (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), ``cls_token`` and ``norm``
carry the same names and layouts as timm's (qkv fused, bias on, LayerNorm eps 1e-6, exact GELU). An exported file
holds the encoder only: no decoder, predictor, projector or teacher.

ResNets (``engine.models.resnet``) carry torchvision's names, which are timm's too (``conv1``, ``bn1``,
``layerN.M.convK/bnK/downsample.{0,1}``, ``fc``): ``RESNET_RULES`` maps them one to one and rejects any other name,
so both formats hold the same tensors. BatchNorm running statistics are exported with the weights. The encoder has
no ``fc``: build timm's model with ``num_classes=0`` (or set torchvision's ``fc`` to ``nn.Identity()``) and load
strictly; its pooled output is our ``features``. A ``small``-stem ResNet (3x3 stride-1 ``conv1``, no max-pool)
loads once ``conv1`` is replaced by that convolution and ``maxpool`` by ``nn.Identity()`` (the JSON says so).

The sidecar ``<file>.json`` (also stored in the safetensors header) records the format, the architecture, the
timm model name where one matches (``vit_base_patch16_224``, ``resnet50``...), the keyword arguments that build the
same model in timm, the image size, the input normalisation and the sha256 of the run's resolved config.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from sslpt.engine.config import ConfigError
from sslpt.engine.models.resnet import BasicBlock, Bottleneck, ResNet, resnet_arch_name
from sslpt.engine.models.vit import VisionTransformer

FORMATS = ("timm", "torch")
# (pattern on our name, replacement giving timm's); applied in order, the first match wins, no match = same name
VIT_RULES: tuple[tuple[str, str], ...] = ((r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),)
VIT_RULES_FROM_TIMM: tuple[tuple[str, str], ...] = ((r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.\1"),)
# torchvision's ResNet names are timm's: identity, but only for names of that layout (anything else is an error)
RESNET_RULES: tuple[tuple[str, str], ...] = (
    (r"^((conv1|bn1|fc)\.(weight|bias|running_mean|running_var|num_batches_tracked))$", r"\1"),
    (r"^(layer\d+\.\d+\.(conv\d|bn\d|downsample\.[01])\.(weight|bias|running_mean|running_var|"
     r"num_batches_tracked))$", r"\1"),
)
_TIMM_VIT_NAMES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
                   (1024, 24, 16): "vit_large", (1280, 32, 16): "vit_huge"}


class ExportError(ConfigError):
    """A file or an encoder that cannot be exported or imported; the message says why."""


def _rename(name: str, rules, *, identity_ok: bool = True) -> str:
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    if not identity_ok:
        raise ExportError(f"no timm name for tensor {name!r}")
    return name


def export_state(module: nn.Module, fmt: str = "timm", rules=VIT_RULES) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers (float32, contiguous, on the CPU) under timm's names or ours."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    state = module.state_dict()
    rename = (lambda n: _rename(n, rules, identity_ok=rules is VIT_RULES)) if fmt == "timm" else (lambda n: n)
    out = {}
    for name, tensor in state.items():
        value = tensor.detach().cpu()
        out[rename(name)] = (value.float() if value.is_floating_point() else value).contiguous().clone()
    return out


def timm_vit_kwargs(encoder: VisionTransformer, pool: str = "cls") -> dict:
    """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` for the same network, with no
    classifier head (``num_classes=0``): ``forward_features`` gives our normalised tokens, ``forward`` our
    ``features(pool)`` (cls token, or the mean of the patch tokens with ``pool='mean'``)."""
    if pool not in ("cls", "mean"):
        raise ExportError(f"pool must be cls or mean, got {pool!r}")
    width, depth = encoder.embed_dim, len(encoder.blocks)
    heads = encoder.blocks[0].attn.num_heads if depth else 1
    hidden = encoder.blocks[0].mlp.fc1.out_features if depth else 4 * width
    return {"img_size": encoder.grid * encoder.patch_size, "patch_size": encoder.patch_size,
            "in_chans": encoder.patch_embed.in_channels, "num_classes": 0, "embed_dim": width, "depth": depth,
            "num_heads": heads, "mlp_ratio": hidden / width, "qkv_bias": True, "class_token": True,
            "global_pool": "token" if pool == "cls" else "avg", "fc_norm": False}


def timm_vit_name(kwargs: dict) -> str | None:
    """timm's registered model name for these kwargs (3 channels, mlp ratio 4), e.g. ``vit_base_patch16_224``."""
    arch = _TIMM_VIT_NAMES.get((kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]))
    if arch is None or kwargs["in_chans"] != 3 or kwargs["mlp_ratio"] != 4.0:
        return None
    return f"{arch}_patch{kwargs['patch_size']}_{kwargs['img_size']}"


def config_digest(cfg) -> str:
    """sha256 of the run's resolved config as TOML: two exports from the same config carry the same digest."""
    from sslpt.engine.config import to_toml

    return hashlib.sha256(to_toml(cfg).encode()).hexdigest()


def data_normalisation(cfg) -> dict:
    """How the images the encoder saw were normalised: per-channel mean/std of pixels in [0, 1], or for digits
    the scalar train-split statistics of its 0..16 pixel values."""
    d, channels = cfg.data, cfg.model.in_chans
    if d.name == "digits":
        from sslpt.engine.data.digits import _raw_digits, stratified_split

        images, labels = _raw_digits()
        train = images[stratified_split(labels, d.val_fraction, 0)[0]]
        return {"pixel_range": [0, 16], "mean": [float(train.mean())] * channels,
                "std": [float(train.std())] * channels}
    from sslpt.engine.data.folder import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD

    rgb = channels == 3
    return {"pixel_range": [0, 1], "mean": list(IMAGENET_MEAN if rgb else GRAY_MEAN),
            "std": list(IMAGENET_STD if rgb else GRAY_STD)}


def save_encoder(encoder: nn.Module, path: Path, *, fmt: str = "timm", pool: str = "cls",
                 extra: dict | None = None) -> dict:
    """Write ``encoder`` to ``path`` (safetensors) and ``path.json``; returns the JSON's content."""
    from safetensors.torch import save_file

    if isinstance(encoder, ResNet):
        require_library_width(encoder)
        meta, rules = {**resnet_meta(encoder, fmt, pool), **(extra or {})}, RESNET_RULES
    elif isinstance(encoder, VisionTransformer):
        kwargs = timm_vit_kwargs(encoder, pool)
        meta = {"format": fmt, "architecture": "vit", "timm_model": timm_vit_name(kwargs), "timm_kwargs": kwargs,
                "img_size": kwargs["img_size"], **(extra or {})}
        rules = VIT_RULES
    else:
        raise ExportError(f"export supports the engine's VisionTransformer and ResNet encoders, got "
                          f"{type(encoder).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(export_state(encoder, fmt, rules), str(path), metadata={"sslpt": json.dumps(meta)})
    Path(f"{path}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def require_library_width(encoder: ResNet, field: str = "model.resnet_width") -> None:
    """A ResNet whose first stage is not 64 wide has no timm / torchvision name: a one-line error naming ``field``."""
    if encoder.width != 64:
        raise ExportError(f"{field}={encoder.width}: export writes timm / torchvision ResNets, whose names all mean "
                          f"width 64; retrain with {field}=64 to export")


def resnet_meta(encoder: ResNet, fmt: str, pool: str = "mean") -> dict:
    """The JSON of a ResNet export: its name, stem, channels, training resolution and how timm rebuilds it."""
    if pool not in ("cls", "mean"):
        raise ExportError(f"pool must be cls or mean, got {pool!r}")
    name = resnet_arch_name(encoder)
    meta = {"format": fmt, "architecture": "resnet", "model": name,
            "block": encoder.block.__name__, "layers": list(encoder.layers), "resnet_stem": encoder.stem,
            "in_chans": encoder.in_chans, "img_size": encoder.img_size, "embed_dim": encoder.embed_dim,
            "timm_model": name, "timm_kwargs": {"in_chans": encoder.in_chans, "num_classes": 0},
            "features": "global average pool of layer4 (timm forward with num_classes=0)"}
    if encoder.stem == "small":
        meta["stem_note"] = ("conv1 is a 3x3 stride-1 convolution (padding 1, no bias) and there is no max-pool: "
                             "replace the library model's conv1 and set its maxpool to nn.Identity() before loading")
    return meta


def read_encoder_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file; the metadata from its header, else its sidecar JSON, else {}."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no encoder file {path}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    meta = json.loads(header["sslpt"]) if "sslpt" in header else {}
    if not meta and Path(f"{path}.json").is_file():
        meta = json.loads(Path(f"{path}.json").read_text())
    return load_file(str(path)), meta


def _vit_shape(state: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ViT's shape, from the metadata where present, else read off the tensors (heads: 64 channels each)."""
    if "timm_kwargs" in meta:
        return meta["timm_kwargs"]
    try:
        width, chans, patch, _ = state["patch_embed.proj.weight"].shape
        tokens = state["pos_embed"].shape[1] - 1
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise ExportError(f"not a timm ViT state: {err}") from err
    grid = int(round(tokens ** 0.5))
    return {"img_size": grid * patch, "patch_size": patch, "in_chans": chans, "embed_dim": width, "depth": depth,
            "num_heads": max(1, width // 64), "mlp_ratio": hidden / width}


def _load_exactly(encoder: nn.Module, state: dict[str, torch.Tensor], kind: str) -> None:
    """Load ``state`` into ``encoder`` when it has exactly the encoder's names and shapes; else an ExportError
    naming the first few missing, unexpected and mis-shaped tensors."""
    expected = encoder.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise ExportError(f"the file does not fit this {kind}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                          f"shape mismatch {wrong[:3]}")
    encoder.load_state_dict(state, strict=True)


def load_timm_state(encoder: VisionTransformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy a timm-named ViT state into ``encoder`` (strict over the encoder's tensors); returns what the file
    holds beyond the encoder, i.e. a classifier's ``head.*`` and ``fc_norm.*`` (anything else is an error)."""
    ours, rest = {}, {}
    for name, tensor in state.items():
        if name.startswith(("head.", "fc_norm.")):
            rest[name] = tensor
        else:
            ours[_rename(name, VIT_RULES_FROM_TIMM)] = tensor
    _load_exactly(encoder, ours, "ViT")
    return rest


def _resnet_from_state(state: dict[str, torch.Tensor], meta: dict) -> ResNet:
    """A ResNet shaped as the file's tensors say (block type, blocks per stage, stem, channels)."""
    try:
        conv1 = state["conv1.weight"]
        layers = [1 + max(int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k)))
                  for i in (1, 2, 3, 4)]
    except (KeyError, ValueError) as err:
        raise ExportError(f"not a torchvision/timm ResNet state: {err}") from err
    block = Bottleneck if "layer1.0.conv3.weight" in state else BasicBlock
    stem = {7: "imagenet", 3: "small"}.get(conv1.shape[-1])
    if stem is None:
        raise ExportError(f"conv1 is a {conv1.shape[-1]}x{conv1.shape[-1]} convolution: neither the imagenet (7x7) "
                          f"nor the small (3x3) ResNet stem")
    return ResNet(block, layers, in_chans=conv1.shape[1], stem=stem, img_size=meta.get("img_size"))


def load_resnet_state(encoder: ResNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy a torchvision/timm-named ResNet state into ``encoder`` (strict over the encoder's tensors); returns
    a classifier's ``fc.*`` tensors (anything else beyond the encoder is an error)."""
    ours = {k: v for k, v in state.items() if not k.startswith("fc.")}
    rest = {k: v for k, v in state.items() if k.startswith("fc.")}
    _load_exactly(encoder, ours, "ResNet")
    return rest


def encoder_from_file(path: Path, attn_backend: str = "auto") -> tuple[VisionTransformer | ResNet, dict]:
    """The reverse of ``save_encoder`` for either format, and the import path for any timm ViT or
    torchvision/timm ResNet state dict file (fine-tuning, frozen teachers): (encoder with the file's weights,
    metadata). ``attn_backend`` applies to a ViT."""
    state, meta = read_encoder_file(path)
    if meta.get("architecture") == "resnet" or "layer1.0.conv1.weight" in state:
        encoder = _resnet_from_state(state, meta)
        extras = load_resnet_state(encoder, state)
        return encoder, {**meta, "extra_tensors": sorted(extras)}
    if meta.get("format") == "torch":   # our own names: rename to timm's first, then one import path
        state = {_rename(name, VIT_RULES): tensor for name, tensor in state.items()}
    shape = _vit_shape(state, meta)
    encoder = VisionTransformer(shape["img_size"], shape["patch_size"], shape["in_chans"], shape["embed_dim"],
                                shape["depth"], shape["num_heads"], shape["mlp_ratio"], attn_backend)
    extras = load_timm_state(encoder, state)
    return encoder, {**meta, "extra_tensors": sorted(extras)}


__all__ = ["export_state", "save_encoder", "read_encoder_file", "load_timm_state", "load_resnet_state",
           "encoder_from_file", "require_library_width", "resnet_meta", "timm_vit_kwargs", "timm_vit_name",
           "VIT_RULES", "RESNET_RULES", "ExportError", "FORMATS"]
