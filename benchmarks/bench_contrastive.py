"""Benchmarks of the contrastive family: info_nce (one direction and CLIP-symmetric) and nt_xent.

Providers:
- "reference": the op's ``_ref``: fp32 logits materialised in full, F.cross_entropy (what most code does;
  the matmul runs on fp32 inputs, at torch's float32 matmul precision).
- "compile": torch.compile of the reference (still materialises the N x N matmul output).
- "chunked": open_clip-style chunked cross-entropy: 1024 rows at a time, logits from a matmul in the
  input dtype, each chunk checkpointed so only one chunk of logits is alive; the logits still go
  through HBM (written, read, recomputed in the backward).
- "triton": the public op with backend="triton" (tiles in SRAM, only the row statistics in HBM).
- "cuda": the public op with backend="cuda" (csrc/lse.cu: cuBLAS logits in blocks of rows through HBM, hand-written
  log-sum-exp and gradient-weight kernels); info_nce only, skipped with the reason where the extension is unavailable.
Materialising providers are skipped (with the reason printed) where the logits would not fit in memory.

Modes "fwd" and "full" (forward + backward). FLOPs are the minimal dense work of the op, so TFLOP/s and the
roofline fraction compare providers fairly: fwd 2 M^2 d for one M x M similarity matrix, full 8 M^2 d
(S once, then dQ and dK); M = N for info_nce (both directions share S when symmetric), M = 2N for
nt_xent. The triton kernel does more than this minimum (it recomputes S in each backward pass: 10 M^2 d
per direction), so its roofline fraction is conservative. "roofline" = time at the measured bf16 matmul
rate / measured time.

Shapes: N in {4096, 16384, 65536} x d=256 bf16 for info_nce; N=16384 for the symmetric and nt_xent
cases; a tiny fp32 case on CPU (Triton under the interpreter: the numbers only check the plumbing).

    python -m benchmarks.bench_contrastive [--device cuda] [--json out.json]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from benchmarks.harness import ProviderUnavailable, Row, bench, cli_main, loss_steps
from sslpt.kernels import _cuda
from sslpt.kernels._backend import triton_usable
from sslpt.kernels.info_nce import info_nce, info_nce_ref
from sslpt.kernels.nt_xent import nt_xent, nt_xent_ref

FAMILIES = ("info_nce", "info_nce_symmetric", "nt_xent")
PROVIDERS = ("reference", "compile", "chunked", "triton", "cuda")
TEMPERATURE = 0.07
CHUNK = 1024


@dataclass(frozen=True)
class Shape:
    n: int
    dim: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"N{self.n} d{self.dim} {str(self.dtype)[6:]}"


def shapes(family: str, tiny: bool) -> list[Shape]:
    if tiny:
        return [Shape(32, 16, torch.float32)]
    sizes = (4096, 16384, 65536) if family == "info_nce" else (16384,)
    return [Shape(n, 256, torch.bfloat16) for n in sizes]


# ---------------------------------------------------------------------------------------------
# Chunked baselines (open_clip-style): 1024 rows of logits at a time, recomputed in the backward.
# ---------------------------------------------------------------------------------------------
def _chunk_ce(rows: torch.Tensor, keys: torch.Tensor, scale: float, labels: torch.Tensor,
              self_offset: int | None) -> torch.Tensor:
    logits = (rows @ keys.T).float() * scale
    if self_offset is not None:  # NT-Xent: the view itself is not a candidate
        r = torch.arange(rows.shape[0], device=rows.device)
        logits = logits.index_put((r, r + self_offset), torch.tensor(float("-inf"), device=rows.device))
    return F.cross_entropy(logits, labels, reduction="sum")


def _chunked_ce(rows, keys, scale, labels, exclude_self: bool) -> torch.Tensor:
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], CHUNK):
        end = min(start + CHUNK, rows.shape[0])
        total = total + checkpoint(_chunk_ce, rows[start:end], keys, scale, labels[start:end],
                                   start if exclude_self else None, use_reentrant=False)
    return total / rows.shape[0]


def info_nce_chunked(q, k, temperature: float, symmetric: bool = False) -> torch.Tensor:
    q = F.normalize(q.float(), dim=-1).to(q.dtype)
    k = F.normalize(k.float(), dim=-1).to(k.dtype)
    labels = torch.arange(q.shape[0], device=q.device)
    loss = _chunked_ce(q, k, 1.0 / temperature, labels, False)
    return 0.5 * (loss + _chunked_ce(k, q, 1.0 / temperature, labels, False)) if symmetric else loss


def nt_xent_chunked(z1, z2, temperature: float) -> torch.Tensor:
    z = torch.cat([F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)]).to(z1.dtype)
    n = z1.shape[0]
    labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return _chunked_ce(z, z, 1.0 / temperature, labels, True)


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


def _guard_memory(device, matrix: int, copies: int, factory):
    """Skip a provider that materialises ``copies`` fp32 [matrix x matrix] tensors where they cannot fit
    (estimated first, and an out-of-memory error on the first step is reported the same way)."""
    def guarded(mode: str):
        if torch.device(device).type != "cuda":
            return factory(mode)
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        need = copies * (2 if mode == "full" else 1) * matrix**2 * 4
        if need > 0.9 * free:
            raise ProviderUnavailable(f"materialising the {matrix}x{matrix} fp32 logits needs ~{need / 1e9:.0f} GB "
                                      f"({free / 1e9:.0f} GB free)")
        try:
            step = factory(mode)
            step()
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise ProviderUnavailable(f"out of memory with the {matrix}x{matrix} logits materialised") from exc
        return step
    return guarded


def _guard_compile(factory):
    def guarded(mode: str):
        try:
            step = factory(mode)
            step()
        except (ProviderUnavailable, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - any compile failure means "not available here"
            raise ProviderUnavailable(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return step
    return guarded


def _guard_triton(device, factory):
    def guarded(mode: str):
        ok, why = triton_usable(torch.device(device))
        if not ok:
            raise ProviderUnavailable(why)
        return factory(mode)
    return guarded


def _guard_cuda(device, factory):
    def guarded(mode: str):
        if factory is None:
            raise ProviderUnavailable("no CUDA kernel for this op")
        ok, why = _cuda.usable(device)
        if not ok:
            raise ProviderUnavailable(why)
        return factory(mode)
    return guarded


def _case(family: str, s: Shape, device, compile_backend: str):
    kw = dict(device=device, dtype=s.dtype, requires_grad=True)
    a, b = torch.randn(s.n, s.dim, **kw), torch.randn(s.n, s.dim, **kw)
    t = TEMPERATURE
    if family == "nt_xent":
        ref, chunked = (lambda: nt_xent_ref(a, b, t)), (lambda: nt_xent_chunked(a, b, t))
        fast = lambda: nt_xent(a, b, t, backend="triton")  # noqa: E731
        cuda = None  # no CUDA kernel for nt_xent
        compiled_ref, matrix = torch.compile(nt_xent_ref, backend=compile_backend, dynamic=False), 2 * s.n
        compiled = lambda: compiled_ref(a, b, t)  # noqa: E731
    else:
        sym = family == "info_nce_symmetric"
        ref = lambda: info_nce_ref(a, b, t, True, sym)  # noqa: E731
        chunked = lambda: info_nce_chunked(a, b, t, sym)  # noqa: E731
        fast = lambda: info_nce(a, b, t, symmetric=sym, backend="triton")  # noqa: E731
        cuda = lambda: info_nce(a, b, t, symmetric=sym, backend="cuda")  # noqa: E731
        compiled_ref, matrix = torch.compile(info_nce_ref, backend=compile_backend, dynamic=False), s.n
        compiled = lambda: compiled_ref(a, b, t, True, sym)  # noqa: E731
    leaves = [a, b]
    copies = 3 if family == "info_nce" else 4  # logits, scaled logits, log-softmax (+ the transposed direction)
    providers = {
        "reference": _guard_memory(device, matrix, copies, loss_steps(ref, leaves)),
        "compile": _guard_memory(device, matrix, 3, _guard_compile(loss_steps(compiled, leaves))),
        "chunked": loss_steps(chunked, leaves),
        "triton": _guard_triton(device, loss_steps(fast, leaves)),
        "cuda": _guard_cuda(device, loss_steps(cuda, leaves) if cuda is not None else None),
    }
    flops = 2 * matrix**2 * s.dim
    return providers, {"fwd": flops, "full": 4 * flops}


def run(device, tiny: bool, *, warmup: int | None = None, rep: int | None = None, families=FAMILIES,
        compile_backend: str | None = None) -> list[Row]:
    """All rows for ``families`` on ``device``; ``tiny`` picks the small CPU shape (and few repetitions)."""
    warmup = warmup if warmup is not None else (1 if tiny else 10)
    rep = rep if rep is not None else (2 if tiny else 50)
    if compile_backend is None:  # inductor on CPU needs a C++ toolchain and minutes: trace only there
        compile_backend = "eager" if torch.device(device).type == "cpu" else "inductor"
    rows: list[Row] = []
    for family in families:
        for s in shapes(family, tiny):
            providers, flops = _case(family, s, device, compile_backend)
            rows += bench(family, s.name, providers, flops=flops, modes=("fwd", "full"), device=device,
                          warmup=warmup, rep=rep)
    return rows


def main(argv: list[str] | None = None) -> None:
    cli_main("contrastive family", __doc__.splitlines()[0], run,
             lambda roof: (f"measured {roof['matmul_dtype']} matmul {roof['matmul_tflops']:.2f} TFLOP/s; roofline = "
                               "time at that rate for the minimal FLOPs / measured time; peak MiB = extra memory of one step"),
             choices=FAMILIES, argv=argv)

if __name__ == "__main__":
    main()
