"""ResNet encoders (He et al., 2016) in torchvision's layout, v1.5: a Bottleneck strides on its 3x3 conv.

Parameter and buffer names are torchvision's and timm's (``conv1``, ``bn1``, ``layerN.M.convK``/``bnK``,
``layerN.M.downsample.{0,1}``, ``fc``), so a state dict loads into either library's ResNet strictly. As an
encoder the network has no classifier by default (``num_classes=0``, as timm): ``forward`` gives the
global-average-pooled output of ``layer4``, [B, embed_dim].

``stem="imagenet"`` is the 7x7 stride-2 convolution and 3x3 max-pool (total stride 32); ``stem="small"``
replaces them with a 3x3 stride-1 convolution and no pool (total stride 8), the usual CIFAR-style stem, so
that tiny images (8x8 digits) keep a spatial extent through ``layer4``. Any input resolution works: the
pooling at the end is global. ``width`` is the first stage's width (64: torchvision's and timm's); the stages are
width, 2 width, 4 width and 8 width wide (times the block's expansion), the stem ``width``. Only 64 has a
library name: other widths are for small CPU runs (a width-16 ResNet-18 has ~1/16 of the parameters and FLOPs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STEMS = ("imagenet", "small")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); the first one strides."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut, inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided: v1.5), 1x1 expand by 4 (ResNet-50/101)."""
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + shortcut, inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


# name -> (block, blocks per stage); the names timm and torchvision register for the same networks
RESNET_ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """A ResNet encoder. ``img_size`` is only recorded (the resolution it is trained at, written on export);
    ``num_classes > 0`` adds torchvision's ``fc`` classifier, which ``forward`` then applies."""

    def __init__(self, block: type[nn.Module], layers, *, in_chans: int = 3, stem: str = "imagenet",
                 num_classes: int = 0, zero_init_residual: bool = False, img_size: int | None = None,
                 width: int = 64):
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 block counts >= 1, got {list(layers)}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1 (64: torchvision's ResNets), got {width!r}")
        self.width = width
        self.block, self.layers, self.stem, self.in_chans = block, tuple(int(n) for n in layers), stem, in_chans
        self.img_size = img_size
        self.embed_dim = 8 * width * block.expansion
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(in_chans, width)
        self.bn1 = nn.BatchNorm2d(width)
        self._in_planes = width
        self.layer1 = self._stage(width, self.layers[0], stride=1)
        self.layer2 = self._stage(2 * width, self.layers[1], stride=2)
        self.layer3 = self._stage(4 * width, self.layers[2], stride=2)
        self.layer4 = self._stage(8 * width, self.layers[3], stride=2)
        del self._in_planes
        self.fc = nn.Linear(self.embed_dim, num_classes) if num_classes else None
        self._init_weights(zero_init_residual)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """A stage; its first block changes resolution and/or width, through a 1x1 conv + BN shortcut."""
        out_planes = planes * self.block.expansion
        downsample = None
        if stride != 1 or self._in_planes != out_planes:
            downsample = nn.Sequential(conv1x1(self._in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
        stage = [self.block(self._in_planes, planes, stride, downsample)]
        self._in_planes = out_planes
        stage += [self.block(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's: He-normal (fan_out) convolutions, unit BatchNorms; optionally each residual branch's
        last BatchNorm at zero, so every block starts as the identity (Goyal et al., 2017)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def stage_channels(self, name: str) -> int:
        """Output channels of stage ``name`` (width, 2, 4, 8 x width, times the block's expansion)."""
        return self.width * 2 ** STAGES.index(name) * self.block.expansion

    @property
    def stage_strides(self) -> dict[str, int]:
        """Each stage's output stride relative to the input."""
        first = 4 if self.stem == "imagenet" else 1
        return {name: first * 2 ** i for i, name in enumerate(STAGES)}

    def _stem(self, imgs: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(imgs)), inplace=True)
        if self.stem == "imagenet":
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return x

    def feature_maps(self, imgs: torch.Tensor, layers=("layer2", "layer3", "layer4")) -> dict[str, torch.Tensor]:
        """The outputs of the named stages, {name: [B, C, h, w]}; runs only up to the deepest one named."""
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        unknown = [name for name in layers if name not in STAGES]
        if not layers or unknown:
            raise ValueError(f"layers must name stages among {', '.join(STAGES)}, got {list(layers)}")
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"imgs must be [B, {self.in_chans}, H, W], got {list(imgs.shape)}")
        deepest = max(STAGES.index(name) for name in layers)
        x, out = self._stem(imgs), {}
        for name in STAGES[:deepest + 1]:
            x = getattr(self, name)(x)
            if name in layers:
                out[name] = x
        return out

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim]: the global average of layer4's output."""
        return self.feature_maps(imgs, ("layer4",))["layer4"].mean(dim=(2, 3))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim] pooled features, or [B, num_classes] logits where there is a classifier."""
        x = self.forward_features(imgs)
        return x if self.fc is None else self.fc(x)

    @torch.no_grad()
    def features(self, imgs: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """[B, embed_dim] features for probes. A ResNet has no cls token: ``pool`` "mean" and "cls" both give the
        global average pool (the probe asks for both, as it does of a ViT)."""
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be mean or cls, got {pool!r}")
        return self.forward_features(imgs)


def build_resnet(arch: str, *, in_chans: int = 3, stem: str = "imagenet", num_classes: int = 0,
                 zero_init_residual: bool = False, img_size: int | None = None, width: int = 64) -> ResNet:
    """The ResNet called ``arch`` (one of RESNET_ARCHS), its first stage ``width`` wide (64: the library's)."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(RESNET_ARCHS)}, got {arch!r}")
    block, layers = RESNET_ARCHS[arch]
    return ResNet(block, layers, in_chans=in_chans, stem=stem, num_classes=num_classes,
                  zero_init_residual=zero_init_residual, img_size=img_size, width=width)


def resnet18(**kwargs) -> ResNet:
    return build_resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    return build_resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return build_resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    return build_resnet("resnet101", **kwargs)


def resnet_arch_name(encoder: ResNet) -> str | None:
    """The RESNET_ARCHS name of ``encoder``'s block type and depths, or None for another layout (or a width
    other than 64, which no library name describes)."""
    if encoder.width != 64:
        return None
    for name, (block, layers) in RESNET_ARCHS.items():
        if encoder.block is block and encoder.layers == layers:
            return name
    return None


def resnet_flops(encoder: ResNet, img_size: int | tuple[int, int]) -> float:
    """Forward FLOPs per image at ``img_size`` (2 x the multiply-adds of every convolution and of ``fc``),
    from the shapes alone: each conv's output size follows from its stride, kernel and padding."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    total = 0.0

    def conv(m: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
        nonlocal total
        h = (h + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        w = (w + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
        total += 2.0 * h * w * m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1] / m.groups
        return h, w

    h, w = conv(encoder.conv1, height, width)
    if encoder.stem == "imagenet":
        h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    for name in STAGES:
        for block in getattr(encoder, name):
            in_h, in_w = h, w
            convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
            for c in convs:
                h, w = conv(c, h, w)
            if block.downsample is not None:
                conv(block.downsample[0], in_h, in_w)
    if encoder.fc is not None:
        total += 2.0 * encoder.fc.in_features * encoder.fc.out_features
    return total


__all__ = ["ResNet", "BasicBlock", "Bottleneck", "RESNET_ARCHS", "STEMS", "STAGES", "build_resnet", "resnet18",
           "resnet34", "resnet50", "resnet101", "resnet_arch_name", "resnet_flops"]
