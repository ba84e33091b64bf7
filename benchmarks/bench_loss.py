"""Benchmarks of the loss-prediction family: patch_loss, relative_loss and the two masking draws.

Providers: "reference" (eager PyTorch, the op's ``_ref``), "compile" (torch.compile of the
reference), "triton" (the Triton implementation called directly), "triton_api" (the public
function with backend="triton", i.e. plus its input checks) and "cuda" (the csrc/ kernel, also for the
hard mask's top-k; on GPUs only, skipped with the reason where the extension is unavailable). Modes: "fwd"
and "full" (forward + backward of the scalar loss; ``per_patch`` feeds HPM's relative loss detached, so it
gets no gradient).

Masking ("random_masking", "hard_patch_masking"; mode "fwd" only, they are not differentiable) has
no Triton kernel. Providers: "reference" (the op: rand, [topk, scatter,] argsort, and the inverse
permutation by a scatter), "argsort_twice" (MAE's original second argsort for the inverse) and
"compile". Why no kernel: the draw is already free of host syncs and is a handful of launches on
[B, L] = [256, 196] values, microseconds against a training step of tens of milliseconds; a fused
kernel (sort of value/index keys, inverse and mask in one program per row) would save a few
launches, and the outputs must stay bit-identical to torch.rand's draw, which a kernel could only
reach by reading the same noise. These rows measure what is left to gain.

Shapes: MAE/HPM ViT-B on ImageNet (B=256, L=196, 147 masked, P=16*16*3=768) on GPU with bf16
predictions and fp32 targets and true losses (patchify of fp32 images, as under autocast); a tiny
fp32 case on CPU, where Triton runs under the interpreter and the numbers only check the harness.

    python -m benchmarks.bench_loss [--device cuda] [--json out.json]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.harness import Row, add_cuda, bench, cli_main, guard_compile, guard_triton, loss_steps
from sslpt.kernels import hard_patch_masking, patch_loss, random_masking, relative_loss
from sslpt.kernels.patch_loss import patch_loss_cuda, patch_loss_ref, patch_loss_triton
from sslpt.kernels.relative_loss import relative_loss_cuda, relative_loss_ref, relative_loss_triton

FAMILIES = ("patch_loss", "relative_loss", "masking")
PROVIDERS = {
    "patch_loss": ("reference", "compile", "triton", "triton_api"),
    "relative_loss": ("reference", "compile", "triton", "triton_api"),
    "masking": ("reference", "argsort_twice", "compile"),
}
MODES = {"patch_loss": ("fwd", "full"), "relative_loss": ("fwd", "full"), "masking": ("fwd",)}


GPU_PROVIDERS = ("cuda",)  # added on CUDA devices only (see add_cuda), so not in PROVIDERS / expected_rows



@dataclass(frozen=True)
class Shape:
    batch: int
    num_patches: int  # L
    num_masked: int   # M: the masked patches the relative loss ranks
    patch_dim: int    # P = p*p*3
    dtype: torch.dtype  # predictions; targets and true losses stay fp32

    @property
    def name(self) -> str:
        return f"B{self.batch} L{self.num_patches} M{self.num_masked} P{self.patch_dim} {str(self.dtype)[6:]}"


def shapes(tiny: bool) -> list[Shape]:
    if tiny:
        return [Shape(2, 16, 12, 48, torch.float32)]
    return [Shape(256, 196, 147, 768, torch.bfloat16)]


def expected_rows(tiny: bool) -> list[tuple[str, str]]:
    """(case, provider) pairs that ``run`` reports, whatever the machine (skipped ones as nan rows)."""
    return [(f"{case} {s.name}", provider)
            for s in shapes(tiny) for family in FAMILIES
            for case in (("random", "hard") if family == "masking" else (family,))
            for provider in PROVIDERS[family]]






def _compiled(fn: Callable, backend: str) -> Callable:
    return torch.compile(fn, backend=backend, dynamic=False)


def _patch_loss_case(s: Shape, device, compile_backend: str):
    pred = torch.randn(s.batch, s.num_patches, s.patch_dim, device=device, dtype=s.dtype, requires_grad=True)
    target = torch.randn(s.batch, s.num_patches, s.patch_dim, device=device)
    mask = random_masking(s.batch, s.num_patches, s.num_masked / s.num_patches, device=device).mask
    compiled = _compiled(patch_loss_ref, compile_backend)
    args = (pred, target, mask, True, 1e-6)
    providers = {
        "reference": loss_steps(lambda: patch_loss_ref(*args)[0], [pred]),
        "compile": guard_compile(loss_steps(lambda: compiled(*args)[0], [pred])),
        "triton": guard_triton(device, loss_steps(lambda: patch_loss_triton(*args)[0], [pred])),
        "triton_api": guard_triton(device, loss_steps(lambda: patch_loss(*args, backend="triton")[0], [pred])),
    }
    add_cuda(device, providers, loss_steps(lambda: patch_loss_cuda(*args)[0], [pred]))
    # minimal traffic: read pred and target once, read mask and write per_patch, [write grad_pred]
    n, rows = pred.numel(), s.batch * s.num_patches
    fwd = n * (pred.element_size() + target.element_size()) + rows * (mask.element_size() + 4)
    return providers, {"fwd": fwd, "full": fwd + n * pred.element_size()}


def _relative_loss_case(s: Shape, device, compile_backend: str):
    score = torch.randn(s.batch, s.num_masked, device=device, dtype=s.dtype, requires_grad=True)
    true_loss = torch.rand(s.batch, s.num_masked, device=device)
    compiled = _compiled(relative_loss_ref, compile_backend)
    providers = {
        "reference": loss_steps(lambda: relative_loss_ref(score, true_loss, True), [score]),
        "compile": guard_compile(loss_steps(lambda: compiled(score, true_loss, True), [score])),
        "triton": guard_triton(device, loss_steps(lambda: relative_loss_triton(score, true_loss, True), [score])),
        "triton_api": guard_triton(device, loss_steps(lambda: relative_loss(score, true_loss, backend="triton"),
                                                   [score])),
    }
    add_cuda(device, providers, loss_steps(lambda: relative_loss_cuda(score, true_loss, True), [score]))
    # O(B*M): read scores and true losses, [write the scores' gradient]; the M*M pairs stay on chip
    fwd = score.numel() * (score.element_size() + true_loss.element_size())
    return providers, {"fwd": fwd, "full": fwd + score.numel() * score.element_size()}


def _argsort_twice(batch: int, num_patches: int, keep: int, device):
    """MAE's original draw: the inverse permutation by a second argsort."""
    noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :keep], ids_restore, ids_restore >= keep


def _hard_argsort_twice(score: torch.Tensor, keep: int, num_hard: int):
    noise = torch.rand(score.shape, device=score.device)
    noise.scatter_(1, torch.topk(score.float(), num_hard, dim=1).indices, 2.0)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :keep], ids_restore, ids_restore >= keep


def _masking_cases(s: Shape, device, compile_backend: str):
    ratio, keep = s.num_masked / s.num_patches, s.num_patches - s.num_masked
    num_hard = s.num_masked // 2    # HPM's final schedule: half of the masked set is hard
    score = torch.randn(s.batch, s.num_patches, device=device, dtype=s.dtype)
    draw = _compiled(lambda: random_masking(s.batch, s.num_patches, ratio, device=device), compile_backend)
    hard = _compiled(lambda: hard_patch_masking(score, ratio, num_hard), compile_backend)
    random_providers = {
        "reference": lambda mode: lambda: random_masking(s.batch, s.num_patches, ratio, device=device),
        "argsort_twice": lambda mode: lambda: _argsort_twice(s.batch, s.num_patches, keep, device),
        "compile": guard_compile(lambda mode: draw),
    }
    hard_providers = {
        "reference": lambda mode: lambda: hard_patch_masking(score, ratio, num_hard),
        "argsort_twice": lambda mode: lambda: _hard_argsort_twice(score, keep, num_hard),
        "compile": guard_compile(lambda mode: hard),
    }
    # the top-k selection by the csrc/ radix-select kernel (the random draw has no CUDA kernel)
    add_cuda(device, hard_providers, lambda mode: lambda: hard_patch_masking(score, ratio, num_hard, backend="cuda"))
    # minimal traffic: write ids_keep, ids_restore (int64) and the mask; read the scores
    out = s.batch * (keep * 8 + s.num_patches * 9)
    return [("random", random_providers, {"fwd": out}),
            ("hard", hard_providers, {"fwd": out + score.numel() * score.element_size()})]


def run(device, tiny: bool, *, warmup: int | None = None, rep: int | None = None, families=FAMILIES,
        compile_backend: str = "inductor") -> list[Row]:
    """All rows for ``families`` on ``device``; ``tiny`` picks the small CPU shape (and few repeats)."""
    warmup = warmup if warmup is not None else (2 if tiny else 10)
    rep = rep if rep is not None else (5 if tiny else 50)
    rows: list[Row] = []
    for s in shapes(tiny):
        for family in families:
            if family == "masking":
                cases = _masking_cases(s, device, compile_backend)
            else:
                case_fn = _patch_loss_case if family == "patch_loss" else _relative_loss_case
                cases = [(family, *case_fn(s, device, compile_backend))]
            for case, providers, bytes_moved in cases:
                rows += bench(family, f"{case} {s.name}", providers, bytes_moved=bytes_moved,
                              modes=MODES[family], device=device, warmup=warmup, rep=rep)
    return rows


def main(argv: list[str] | None = None) -> None:
    cli_main("loss-prediction family", __doc__.splitlines()[0], run,
             lambda roof: (f"measured copy bandwidth {roof['copy_gbps']:.1f} GB/s; roofline = minimal traffic at "
                               "that rate / measured time"),
             choices=FAMILIES, argv=argv)

if __name__ == "__main__":
    main()
