"""Benchmarks of the gathering family: gather_tokens, scatter_tokens, embed_visible_patches.

Providers: "reference" (eager PyTorch, the op's ``_ref``), "compile" (torch.compile of the
reference), "triton" (the Triton implementation called directly) and "triton_api" (the public
function with backend="triton", i.e. plus its input checks). embed_visible_patches adds
"embed_all_then_gather", what official MAE does: a stride-p conv over all L patches, + pos, then
a gather of the K visible ones. gather_tokens and scatter_tokens add "cuda" (the hand-written kernel
of csrc/; on GPUs only, skipped with the reason where the extension is unavailable). Modes: "fwd" and "full"
(forward + backward).

Shapes: MAE ViT-B/L on ImageNet (B=256, L=196, K=49, D=768 and 1024, bf16) on GPU; a tiny fp32
case on CPU, where Triton runs under the interpreter and the numbers only check the harness.

    python -m benchmarks.bench_gather [--device cuda] [--json out.json]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.harness import Row, add_cuda, bench, cli_main, guard_compile, guard_triton
from sslpt.kernels import embed_visible_patches, gather_tokens, scatter_tokens
from sslpt.kernels.embed_visible_patches import embed_visible_patches_ref, embed_visible_patches_triton
from sslpt.kernels.gather_tokens import gather_tokens_cuda, gather_tokens_ref, gather_tokens_triton
from sslpt.kernels.scatter_tokens import scatter_tokens_cuda, scatter_tokens_ref, scatter_tokens_triton

FAMILIES = ("gather_tokens", "scatter_tokens", "embed_visible_patches")
PROVIDERS = {
    "gather_tokens": ("reference", "compile", "triton", "triton_api"),
    "scatter_tokens": ("reference", "compile", "triton", "triton_api"),
    "embed_visible_patches": ("reference", "compile", "triton", "triton_api", "embed_all_then_gather"),
}
# "cuda" (the csrc/ kernel, sslpt.kernels._C) runs for gather_tokens and scatter_tokens on GPUs only (add_cuda): it
# cannot run on CPU, where the wiring tests expect a timing from every provider in PROVIDERS.
GPU_PROVIDERS = {"gather_tokens": ("cuda",), "scatter_tokens": ("cuda",)}



@dataclass(frozen=True)
class Shape:
    batch: int
    num_patches: int  # L = (image / patch)**2
    num_keep: int     # K
    dim: int          # D
    image: int
    patch: int
    channels: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"B{self.batch} L{self.num_patches} K{self.num_keep} D{self.dim} {str(self.dtype)[6:]}"


def shapes(tiny: bool) -> list[Shape]:
    if tiny:
        return [Shape(2, 16, 4, 32, 16, 4, 3, torch.float32)]
    return [Shape(256, 196, 49, dim, 224, 16, 3, torch.bfloat16) for dim in (768, 1024)]


def _random_ids(s: Shape, device) -> torch.Tensor:
    return torch.rand(s.batch, s.num_patches, device=device).argsort(dim=1)[:, :s.num_keep]


def _steps(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[str], Callable[[], object]]:
    """Provider factory from a forward closure: "fwd" runs it, "full" also back-propagates a fixed
    random gradient into ``leaves`` (whose .grad is cleared each step, as an optimizer would)."""
    def factory(mode: str) -> Callable[[], object]:
        if mode == "fwd":
            return forward
        grad = torch.randn_like(forward())

        def full():
            for leaf in leaves:
                leaf.grad = None
            forward().backward(grad)
        return full
    return factory


def _compiled(fn: Callable, backend: str) -> Callable:
    return torch.compile(fn, backend=backend, dynamic=False)




def _gather_case(s: Shape, device, compile_backend: str):
    x = torch.randn(s.batch, s.num_patches, s.dim, device=device, dtype=s.dtype, requires_grad=True)
    ids = _random_ids(s, device)
    compiled = _compiled(gather_tokens_ref, compile_backend)
    providers = {
        "reference": _steps(lambda: gather_tokens_ref(x, ids), [x]),
        "compile": guard_compile(_steps(lambda: compiled(x, ids), [x])),
        "triton": guard_triton(device, _steps(lambda: gather_tokens_triton(x, ids), [x])),
        "triton_api": guard_triton(device, _steps(lambda: gather_tokens(x, ids, backend="triton"), [x])),
    }
    add_cuda(device, providers, _steps(lambda: gather_tokens_cuda(x, ids), [x]))
    e, kept = x.element_size(), s.batch * s.num_keep * s.dim
    fwd = 2 * kept * e + ids.numel() * ids.element_size()
    bwd = kept * e + s.batch * s.num_patches * s.dim * e  # read dout, write all of dx
    return providers, {"fwd": fwd, "full": fwd + bwd}, None


def _scatter_case(s: Shape, device, compile_backend: str):
    x_vis = torch.randn(s.batch, s.num_keep, s.dim, device=device, dtype=s.dtype, requires_grad=True)
    fill = torch.randn(s.dim, device=device, dtype=s.dtype, requires_grad=True)
    ids = _random_ids(s, device)
    L = s.num_patches
    compiled = _compiled(scatter_tokens_ref, compile_backend)
    providers = {
        "reference": _steps(lambda: scatter_tokens_ref(x_vis, ids, L, fill), [x_vis, fill]),
        "compile": guard_compile(_steps(lambda: compiled(x_vis, ids, L, fill), [x_vis, fill])),
        "triton": guard_triton(device, _steps(lambda: scatter_tokens_triton(x_vis, ids, L, fill), [x_vis, fill])),
        "triton_api": guard_triton(
            device, _steps(lambda: scatter_tokens(x_vis, ids, L, fill, backend="triton"), [x_vis, fill])),
    }
    add_cuda(device, providers, _steps(lambda: scatter_tokens_cuda(x_vis, ids, L, fill), [x_vis, fill]))
    e, kept, full_size = x_vis.element_size(), s.batch * s.num_keep * s.dim, s.batch * L * s.dim
    fwd = kept * e + full_size * e
    bwd = full_size * e + kept * e  # read dout once, write dx_vis
    return providers, {"fwd": fwd, "full": fwd + bwd}, None


def _embed_all_then_gather(imgs, ids, weight, bias, pos, patch):
    tokens = torch.nn.functional.conv2d(imgs, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    return gather_tokens_ref(tokens + pos.to(tokens.dtype), ids)


def _embed_case(s: Shape, device, compile_backend: str):
    kw = dict(device=device, dtype=s.dtype)
    imgs = torch.randn(s.batch, s.channels, s.image, s.image, **kw)
    weight = (torch.randn(s.dim, s.channels, s.patch, s.patch, **kw) * 0.02).requires_grad_()
    bias = torch.zeros(s.dim, **kw).requires_grad_()
    pos = torch.randn(1, s.num_patches, s.dim, **kw)  # MAE's sin-cos table: frozen
    ids = _random_ids(s, device)
    args = (imgs, ids, weight, bias, pos, s.patch)
    leaves = [weight, bias]
    compiled = _compiled(embed_visible_patches_ref, compile_backend)
    providers = {
        "reference": _steps(lambda: embed_visible_patches_ref(*args), leaves),
        "compile": guard_compile(_steps(lambda: compiled(*args), leaves)),
        "triton": guard_triton(device, _steps(lambda: embed_visible_patches_triton(*args), leaves)),
        "triton_api": guard_triton(device, _steps(lambda: embed_visible_patches(*args, backend="triton"), leaves)),
        "embed_all_then_gather": _steps(lambda: _embed_all_then_gather(*args), leaves),
    }
    e = imgs.element_size()
    rows, patch_dim = s.batch * s.num_keep, s.channels * s.patch**2
    fwd_bytes = (rows * patch_dim + patch_dim * s.dim + s.num_patches * s.dim + rows * s.dim) * e
    bwd_bytes = (rows * s.dim + rows * patch_dim + patch_dim * s.dim) * e  # dout, pixels again, dW
    matmul = 2 * rows * patch_dim * s.dim
    return providers, {"fwd": fwd_bytes, "full": fwd_bytes + bwd_bytes}, {"fwd": matmul, "full": 2 * matmul}


_CASES = {"gather_tokens": _gather_case, "scatter_tokens": _scatter_case, "embed_visible_patches": _embed_case}


def run(device, tiny: bool, *, warmup: int = 10, rep: int = 50, families=FAMILIES,
        compile_backend: str = "inductor") -> list[Row]:
    """All rows for ``families`` on ``device``; ``tiny`` picks the small CPU shape."""
    rows: list[Row] = []
    for family in families:
        for s in shapes(tiny):
            providers, bytes_moved, flops = _CASES[family](s, device, compile_backend)
            rows += bench(family, s.name, providers, bytes_moved=bytes_moved, flops=flops,
                          modes=("fwd", "full"), device=device, warmup=warmup, rep=rep)
    return rows


def main(argv: list[str] | None = None) -> None:
    cli_main("gathering family", __doc__.splitlines()[0], run,
             lambda roof: (f"measured copy bandwidth {roof['copy_gbps']:.1f} GB/s, {roof['matmul_dtype']} matmul "
                               f"{roof['matmul_tflops']:.2f} TFLOP/s; roofline = minimal time at those rates / measured time"),
             choices=FAMILIES, argv=argv)

if __name__ == "__main__":
    main()
