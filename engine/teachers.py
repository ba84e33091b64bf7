"""Frozen teachers for feature-target objectives (MaskDistill-style distillation, MimCo): a pre-trained encoder
loaded once, never trained, whose token features are computed once per step without gradient.

Sources (``load_frozen_teacher``):

- a run folder of this engine (its resolved config and newest checkpoint that verifies, as ``probe`` loads it):
  the objective's ``encoder``, e.g. a MoCo v3 or DINO run's ViT;
- a safetensors file in timm's ViT layout (``python -m sslpt export``, or any timm ViT state dict), through
  ``engine.export.encoder_from_file``;
- ``"random"``: a frozen, randomly initialised ViT of the student's shape (seeded): the random-teacher baseline.

Patch grids. The teacher sees the student's (normalised) image. A teacher trained at another image size gets the
image resized (bilinear) to its own size first, because its position embeddings are fixed to its grid. If its
patch grid then differs from the student's, ``grid_mismatch = "error"`` (the default) refuses, naming both grids;
``"interpolate"`` resamples the teacher's patch-feature map bilinearly to the student's grid (targets then blur
across patch borders: prefer a teacher whose grid matches). Channel counts must match.

Precision: the teacher runs under the trainer's autocast (bf16 where the run uses it); the caller converts the
targets to fp32 before normalising them. Normalisation: the teacher receives the student's input normalisation;
an external teacher trained with other statistics (CLIP's) needs the data normalised for it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

TeacherTokens = Literal["output", "pre_norm"]
GridMismatch = Literal["error", "interpolate"]


class FrozenTeacher(nn.Module):
    """A frozen encoder in eval mode. ``forward(imgs)`` -> (patch features [B, L, D] on the student's grid,
    cls feature [B, D]), under ``no_grad``. ``tokens``: ``"output"`` (the encoder's output tokens, after its final
    LayerNorm) or ``"pre_norm"`` (the input of that LayerNorm: the last block's residual stream, what CLIP-based
    MaskDistill reimplementations regress; the same as ``"output"`` for an encoder without a final norm)."""

    def __init__(self, encoder: nn.Module, student_grid: int, tokens: TeacherTokens = "pre_norm",
                 grid_mismatch: GridMismatch = "error", description: str = ""):
        super().__init__()
        if tokens not in ("output", "pre_norm"):
            raise ValueError(f"tokens must be 'output' or 'pre_norm', got {tokens!r}")
        if grid_mismatch not in ("error", "interpolate"):
            raise ValueError(f"grid_mismatch must be 'error' or 'interpolate', got {grid_mismatch!r}")
        if encoder.grid != student_grid and grid_mismatch == "error":
            raise ValueError(f"the teacher {description or ''} has a {encoder.grid}x{encoder.grid} patch grid, the "
                             f"student {student_grid}x{student_grid}: set grid_mismatch = \"interpolate\" to resample "
                             f"the teacher's features, or use a teacher with the student's grid")
        self.encoder = encoder.requires_grad_(False).eval()
        self.student_grid = student_grid
        self.tokens = tokens
        self.description = description
        self.in_chans = encoder.patch_embed.in_channels
        self.img_size = encoder.grid * encoder.patch_size
        self.dim = encoder.embed_dim

    def train(self, mode: bool = True):
        super().train(False)   # always in eval mode
        return self

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if imgs.shape[1] != self.in_chans:
            raise ValueError(f"the teacher takes {self.in_chans}-channel images, got {imgs.shape[1]} channels")
        if imgs.shape[-1] != self.img_size or imgs.shape[-2] != self.img_size:
            imgs = F.interpolate(imgs, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        captured = []
        norm = getattr(self.encoder, "norm", None)
        hook = None
        if self.tokens == "pre_norm" and isinstance(norm, nn.LayerNorm):
            hook = norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            tokens = self.encoder(imgs)
        finally:
            if hook is not None:
                hook.remove()
        if captured:
            tokens = captured[0]
        patches, cls = tokens[:, 1:], tokens[:, 0]
        grid = int(math.isqrt(patches.shape[1]))
        if grid != self.student_grid:
            batch, _, dim = patches.shape
            fmap = patches.transpose(1, 2).reshape(batch, dim, grid, grid).float()
            fmap = F.interpolate(fmap, size=(self.student_grid, self.student_grid), mode="bilinear",
                                 align_corners=False)
            patches = fmap.flatten(2).transpose(1, 2).to(tokens.dtype)
        return patches, cls


def load_frozen_teacher(source: str, model, tokens: TeacherTokens = "pre_norm",
                        grid_mismatch: GridMismatch = "error", seed: int = 0) -> FrozenTeacher:
    """The teacher ``source`` names (a run folder, a safetensors file or ``"random"``) for a student built from
    the ModelConfig ``model`` (its grid, and ``model.attn_backend`` for the teacher's attention too)."""
    student_grid = model.img_size // model.patch_size
    if source == "random":
        from sslpt.engine.models.vit import build_vit

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = build_vit(model)
        return FrozenTeacher(encoder, student_grid, tokens, grid_mismatch, "random init")
    path = Path(source).expanduser()
    if path.is_dir():
        from sslpt.engine.pretrained import load_run

        _, objective, checkpoint = load_run(path, [f"model.attn_backend={model.attn_backend}"])
        encoder = objective.encoder
        description = f"{path} ({checkpoint.name})"
    elif path.is_file():
        from sslpt.engine.export import encoder_from_file

        encoder, _ = encoder_from_file(path, attn_backend=model.attn_backend)
        description = str(path)
    else:
        raise FileNotFoundError(f"no teacher at {source!r}: expected a run folder of this engine, a timm-format "
                                f"safetensors file, or \"random\"")
    if not hasattr(encoder, "grid") or not hasattr(encoder, "patch_embed"):
        raise ValueError(f"the teacher {description} is a {type(encoder).__name__}, not a ViT encoder")
    return FrozenTeacher(encoder, student_grid, tokens, grid_mismatch, description)


__all__ = ["FrozenTeacher", "load_frozen_teacher"]
