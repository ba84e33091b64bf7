"""MLP heads of the contrastive objectives: SimCLR's projector, MoCo v3's projector and predictor.

MoCo v3's layout: each hidden layer is Linear (no bias: the BatchNorm after it has one) -> BatchNorm -> ReLU;
the output layer is a Linear followed by a BatchNorm without affine parameters. SimCLR's heads are the same
shape (its code keeps a learnable scale in the last BatchNorm, which the L2 normalisation of the loss
mostly undoes). Under torch.distributed on GPUs the BatchNorms become SyncBatchNorm, as in both codes.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool = True) -> nn.Sequential:
    """``num_layers`` Linear layers; BatchNorm + ReLU after each hidden one, BatchNorm(affine=False) at the end."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def mlp_flops(head: nn.Module) -> float:
    """Forward FLOPs per sample of the head's Linear layers."""
    return sum(2.0 * m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear))


def sync_batchnorm_if_distributed(module: nn.Module, on_gpu: bool) -> nn.Module:
    """SyncBatchNorm across ranks when torch.distributed runs with several ranks on GPUs (SyncBatchNorm has
    no CPU kernel: on CPU each rank normalises its own batch)."""
    if on_gpu and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


__all__ = ["mlp_head", "mlp_flops", "sync_batchnorm_if_distributed"]
