"""SCFS's shallow heads: one per tapped ResNet stage, turning a [B, C, h, w] feature map into a unit vector.

    residual bottleneck (1x1 C -> b, BN, ReLU; 3x3 b -> b, BN, ReLU; 1x1 b -> C, BN; + input; ReLU)
    -> global average pool -> Linear(C, hidden), BN, ReLU, Linear(hidden, out), BN -> L2 normalise

The bottleneck returns to C channels so that the input can be added back; the convolutions have no bias (a
BatchNorm follows each). Initialisation is PyTorch's default for every layer, as the official heads keep it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShallowHead(nn.Module):
    def __init__(self, in_dim: int, bottleneck_dim: int = 256, hidden_dim: int = 2048, out_dim: int = 256):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("bottleneck_dim", bottleneck_dim), ("hidden_dim", hidden_dim),
                            ("out_dim", out_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.conv1 = nn.Conv2d(in_dim, bottleneck_dim, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck_dim)
        self.conv2 = nn.Conv2d(bottleneck_dim, bottleneck_dim, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck_dim)
        self.conv3 = nn.Conv2d(bottleneck_dim, in_dim, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, out_dim] unit vectors from a [B, in_dim, h, w] map (BatchNorms see this call's batch)."""
        if feature_map.dim() != 4 or feature_map.shape[1] != self.conv1.in_channels:
            raise ValueError(f"feature_map must be [B, {self.conv1.in_channels}, h, w], got {list(feature_map.shape)}")
        out = F.relu(self.bn1(self.conv1(feature_map)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = F.relu(self.bn3(self.conv3(out)) + feature_map)
        return F.normalize(self.mlp(out.mean(dim=(2, 3))), dim=-1)

    def flops(self, height: int, width: int) -> float:
        """Forward FLOPs per sample on an [in_dim, height, width] map."""
        convs = sum(2.0 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                    for m in (self.conv1, self.conv2, self.conv3))
        linear = sum(2.0 * m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear))
        return convs * height * width + linear


__all__ = ["ShallowHead"]
