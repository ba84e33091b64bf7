"""DINO's projection head: an MLP to a small L2-normalised bottleneck, then K weight-normalised prototypes.

    h = normalize(MLP(x))            MLP: in -> hidden -> ... -> bottleneck, GELU, BatchNorm only if asked
    z = W h,   W_k = g_k v_k / |v_k| (no bias)

With ``norm_last_layer`` the scales g are fixed at 1, so every prototype is a unit vector and z_k is the cosine
of h and v_k; otherwise g is trained too and the logits are unbounded. The loss never forms z for the whole
batch: the objective hands h and the effective W to ``kernels.prototype_cross_entropy``, and autograd carries
the prototype gradient through the weight norm to v and g (two O(K d) ops).

Parameter names follow DINO's checkpoints (``mlp.*``, ``last_layer.weight_g`` [K, 1], ``last_layer.weight_v``
[K, d]), so its head weights load by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose rows are ``weight_g * weight_v / |weight_v|`` (torch's weight norm over dim 0)."""

    def __init__(self, in_dim: int, out_dim: int, train_scale: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))   # nn.Linear's default, as DINO keeps it
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=train_scale)

    def weight(self) -> torch.Tensor:
        """The effective [K, d] weight, in fp32 (the norm of a bf16 row loses digits the loss then amplifies)."""
        v = self.weight_v.float()
        return self.weight_g.float() * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers += ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_scale=not norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """[N, bottleneck_dim] unit vectors: what the fused loss reads."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K] logits (for inspection and small K; training never materialises them)."""
        return self.last_layer(self.bottleneck(x))

    def flops(self) -> float:
        """Forward FLOPs per sample, the prototypes included."""
        linear = sum(2.0 * m.in_features * m.out_features for m in self.mlp.modules() if isinstance(m, nn.Linear))
        return linear + 2.0 * self.last_layer.weight_v.numel()


__all__ = ["DINOHead", "WeightNormLinear"]
