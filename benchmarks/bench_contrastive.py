"""Benchmarks of the contrastive family: info_nce (one direction, CLIP-symmetric, against a queue), nt_xent, and
DenseCL's dense_match.

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

info_nce_queue is MoCo v2's form (``queue=``, ``in_batch_negatives=False``): N rows against [own key ; Q queued
keys], at DenseCL's dense-loss shapes: N = 32 images x 49 locations (ResNet-50) or x 196 (ViT-B/16), Q = 65,536,
d = 128 bf16; FLOPs counted as for info_nce with N x (1 + Q) logits. dense_match (forward only: MATCH_FAMILIES,
mode "fwd") times the argmax over view 2's locations against the reference's materialised [B, S1, S2] similarity:
B = 32 at S = 49 (C = 2048) and S = 196 (C = 768), and B = 8 at S = 4096 (a 64x64 map, C = 256); FLOPs 2 B S1 S2 C.
Its providers are reference, compile and triton ("chunked" and "cuda" have no dense_match).

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
from sslpt.kernels.dense_match import dense_match, dense_match_ref
from sslpt.kernels.info_nce import info_nce, info_nce_ref
from sslpt.kernels.nt_xent import nt_xent, nt_xent_ref

FAMILIES = ("info_nce", "info_nce_symmetric", "nt_xent", "info_nce_queue")   # losses: modes fwd and full
MATCH_FAMILIES = ("dense_match",)                                             # forward only
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


@dataclass(frozen=True)
class QueueShape:
    n: int
    queue: int
    dim: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"N{self.n} Q{self.queue} d{self.dim} {str(self.dtype)[6:]}"


@dataclass(frozen=True)
class MatchShape:
    batch: int
    locations: int
    channels: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"B{self.batch} S{self.locations} C{self.channels} {str(self.dtype)[6:]}"


def shapes(family: str, tiny: bool) -> list:
    if family == "info_nce_queue":
        if tiny:
            return [QueueShape(32, 64, 16, torch.float32)]
        return [QueueShape(32 * 49, 65536, 128, torch.bfloat16), QueueShape(32 * 196, 65536, 128, torch.bfloat16)]
    if family == "dense_match":
        if tiny:
            return [MatchShape(2, 20, 16, torch.float32)]
        return [MatchShape(32, 49, 2048, torch.bfloat16), MatchShape(32, 196, 768, torch.bfloat16),
                MatchShape(8, 4096, 256, torch.bfloat16)]
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


def _queue_chunk_ce(rows: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, scale: float) -> torch.Tensor:
    logits = torch.cat([(rows * keys).sum(-1, keepdim=True), rows @ queue.T], dim=1).float() * scale
    return F.cross_entropy(logits, torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device), reduction="sum")


def info_nce_queue_chunked(q, k, queue, temperature: float) -> torch.Tensor:
    """MoCo v2's loss ([own key ; queue], label 0) 1024 rows at a time, each chunk checkpointed."""
    q = F.normalize(q.float(), dim=-1).to(q.dtype)
    k = F.normalize(k.float(), dim=-1).to(k.dtype)
    total = q.new_zeros((), dtype=torch.float32)
    for start in range(0, q.shape[0], CHUNK):
        end = min(start + CHUNK, q.shape[0])
        total = total + checkpoint(_queue_chunk_ce, q[start:end], k[start:end], queue, 1.0 / temperature,
                                   use_reentrant=False)
    return total / q.shape[0]


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


def _queue_case(s: QueueShape, device, compile_backend: str):
    kw = dict(device=device, dtype=s.dtype)
    q, k = torch.randn(s.n, s.dim, **kw, requires_grad=True), torch.randn(s.n, s.dim, **kw)
    queue = F.normalize(torch.randn(s.queue, s.dim, device=device), dim=1).to(s.dtype)
    t = TEMPERATURE
    ref = lambda: info_nce_ref(q, k, t, True, False, None, queue, False)  # noqa: E731
    compiled_ref = torch.compile(info_nce_ref, backend=compile_backend, dynamic=False)
    compiled = lambda: compiled_ref(q, k, t, True, False, None, queue, False)  # noqa: E731
    fast = lambda: info_nce(q, k, t, queue=queue, in_batch_negatives=False, backend="triton")  # noqa: E731
    chunked = lambda: info_nce_queue_chunked(q, k, queue, t)  # noqa: E731
    logits = s.n * (1 + s.queue)
    providers = {
        "reference": _guard_logits(device, logits, 3, loss_steps(ref, [q])),
        "compile": _guard_logits(device, logits, 3, _guard_compile(loss_steps(compiled, [q]))),
        "chunked": loss_steps(chunked, [q]),
        "triton": _guard_triton(device, loss_steps(fast, [q])),
        "cuda": _guard_cuda(device, None),   # the CUDA backend has no queue
    }
    flops = 2 * logits * s.dim
    return providers, {"fwd": flops, "full": 4 * flops}


def _match_case(s: MatchShape, device, compile_backend: str):
    f1, f2 = (torch.randn(s.batch, s.locations, s.channels, device=device, dtype=s.dtype) for _ in range(2))
    compiled_ref = torch.compile(dense_match_ref, backend=compile_backend, dynamic=False)
    steps = {"reference": lambda: dense_match_ref(f1, f2), "compile": lambda: compiled_ref(f1, f2),
             "triton": lambda: dense_match(f1, f2, backend="triton")}
    factory = lambda step: (lambda mode: step)  # noqa: E731 - forward only
    similarity = s.batch * s.locations ** 2
    providers = {
        "reference": _guard_logits(device, similarity, 2, factory(steps["reference"])),
        "compile": _guard_logits(device, similarity, 2, _guard_compile(factory(steps["compile"]))),
        "triton": _guard_triton(device, factory(steps["triton"])),
    }
    return providers, {"fwd": 2 * similarity * s.channels}


def _guard_logits(device, count: int, copies: int, factory):
    """_guard_memory for a materialised tensor of ``count`` fp32 values (not a square matrix)."""
    return _guard_memory(device, int(count ** 0.5) + 1, copies, factory)


def _case(family: str, s: Shape, device, compile_backend: str):
    if family == "info_nce_queue":
        return _queue_case(s, device, compile_backend)
    if family == "dense_match":
        return _match_case(s, device, compile_backend)
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


def run(device, tiny: bool, *, warmup: int | None = None, rep: int | None = None,
        families=FAMILIES + MATCH_FAMILIES, compile_backend: str | None = None) -> list[Row]:
    """All rows for ``families`` on ``device``; ``tiny`` picks the small CPU shape (and few repetitions)."""
    warmup = warmup if warmup is not None else (1 if tiny else 10)
    rep = rep if rep is not None else (2 if tiny else 50)
    if compile_backend is None:  # inductor on CPU needs a C++ toolchain and minutes: trace only there
        compile_backend = "eager" if torch.device(device).type == "cpu" else "inductor"
    rows: list[Row] = []
    for family in families:
        for s in shapes(family, tiny):
            providers, flops = _case(family, s, device, compile_backend)
            modes = ("fwd",) if family in MATCH_FAMILIES else ("fwd", "full")
            rows += bench(family, s.name, providers, flops=flops, modes=modes, device=device,
                          warmup=warmup, rep=rep)
    return rows


def main(argv: list[str] | None = None) -> None:
    cli_main("contrastive family", __doc__.splitlines()[0], run,
             lambda roof: (f"measured {roof['matmul_dtype']} matmul {roof['matmul_tflops']:.2f} TFLOP/s; roofline = "
                           "time at that rate for the minimal FLOPs / measured time; peak MiB = extra memory of one "
                           "step"),
             choices=FAMILIES + MATCH_FAMILIES, argv=argv)

if __name__ == "__main__":
    main()
