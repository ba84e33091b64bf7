"""Benchmarks of sparse encoder attention: dense short sequences (MAE), packed ragged samples, SemAIM order masks
(both streams: the content stream's order mask and the query stream's strict one).

Providers:
    reference       sparse_attention_ref (explicit fp32 softmax; a Python loop over samples when packed)
    sdpa            F.scaled_dot_product_attention, PyTorch's own backend choice
    sdpa_flash / sdpa_efficient / sdpa_cudnn   the same, pinned to one backend (CUDA only)
    flex            torch.compile(flex_attention) with a block mask from the order / sample ids (CUDA only)
    xformers        xformers.ops.memory_efficient_attention (BlockDiagonalMask when packed; CUDA only)
    varlen          torch.nn.attention.varlen.varlen_attn (packed case only; CUDA only)
    triton          sparse_attention(backend="triton") (kernels.attention(backend="triton") runs the same kernels)
    auto            kernels.attention(backend="auto"): SDPA on CPU; on CUDA the backend it measured fastest for
                    the case (the choice is printed; the measuring happens before timing); unlike the rows
                    above, the masks and padding it builds are timed: that is what the ViT pays per call
FlexAttention and xformers are skipped, with the reason in the log and "skipped" in the table, where they cannot
run: on CPU (FlexAttention has no CPU backward and its eager CPU path says nothing about speed; xformers is CUDA
only), where xformers is not installed, or where torch.compile fails.
Masks reach SDPA as a boolean [B, 1, N, N] tensor; packed samples reach SDPA, flash/efficient/cuDNN as a padded
batch with a key-padding mask (padding not timed) and FlexAttention as one long sequence with a same-sample mask.
Block masks are built once per case, outside the timed region (SemAIM draws a new order per step: a real
training step would also pay create_block_mask).

Rates: TFLOP/s count only the visible (query, key) pairs: 4 Dh per pair forward, and 3.5x that for forward +
backward (the backward recomputes S: 2.5x the forward, flash-attention's convention). GB/s count the minimal
traffic: read q, k, v and write o (forward); the backward adds reading q, k, v, o, dO and writing dq, dk, dv.
At N = 50 the op is memory-bound (intensity N/2 FLOP/B), so grade it by GB/s and the roofline fraction.

    python -m benchmarks.bench_attention [--device cuda] [--json out.json] [--cases mae_vitb ...]
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import ProviderUnavailable, Row, bench, cli_main
from sslpt.kernels._backend import triton_usable
from sslpt.kernels.attention import _order_mask, _xformers_order_bias, attention, auto_choices
from sslpt.kernels.sparse_attention import _order_visibility, sparse_attention, sparse_attention_ref

PROVIDERS = ("reference", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex", "xformers", "triton",
             "auto")
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION"}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    seqlen: int            # N (dense) or the longest sample (packed)
    head_dim: int
    dtype: torch.dtype
    kind: str = "dense"    # "dense" | "packed" | "order"
    lengths: tuple = field(default=())  # packed sample lengths
    strict: bool = False   # order: query i sees key j iff order[j] < order[i] (SemAIM's query stream)


def cases(tiny: bool) -> list[Case]:
    if tiny:
        return [Case("tiny", 1, 2, 12, 16, torch.float32),
                Case("tiny_packed", 3, 2, 9, 16, torch.float32, "packed", (9, 1, 6)),
                Case("tiny_order", 1, 2, 12, 16, torch.float32, "order"),
                Case("tiny_order_strict", 1, 2, 12, 16, torch.float32, "order", strict=True)]
    gen = torch.Generator().manual_seed(0)
    lengths = tuple(torch.randint(30, 61, (256,), generator=gen).tolist())
    bf16 = torch.bfloat16
    return [Case("mae_vitb_enc", 256, 12, 50, 64, bf16),
            Case("mae_vitl_enc", 256, 16, 50, 64, bf16),
            Case("vitb_full197", 256, 12, 197, 64, bf16),
            Case("mae_decoder197", 256, 16, 197, 32, bf16),
            Case("packed_30to60", 256, 12, max(lengths), 64, bf16, "packed", lengths),
            Case("semaim_order197", 256, 12, 197, 64, bf16, "order"),
            Case("semaim_query197", 256, 12, 197, 64, bf16, "order", strict=True)]


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict            # sparse_attention keywords (cu_seqlens/max_seqlen or order)
    visible_pairs: int      # (sample, query, key) triples that attend, summed over samples
    padded: tuple | None    # packed only: (q, k, v [B, H, Nmax, Dh], key-padding mask [B, 1, 1, Nmax])


def make_inputs(c: Case, device) -> Inputs:
    kw = dict(device=device, dtype=c.dtype)
    if c.kind == "packed":
        lengths = torch.tensor(c.lengths)
        total = int(lengths.sum())
        q, k, v = (torch.randn(total, c.heads, c.head_dim, **kw) for _ in range(3))
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).to(device)
        keep = torch.arange(c.seqlen)[None, :] < lengths[:, None]  # [B, Nmax]
        pad = []
        for t in (q, k, v):
            dense = torch.zeros(c.batch, c.seqlen, c.heads, c.head_dim, **kw)
            dense[keep.to(device)] = t
            pad.append(dense.transpose(1, 2))
        key_mask = keep.to(device)[:, None, None, :]
        return Inputs(q, k, v, dict(cu_seqlens=cu, max_seqlen=c.seqlen), int((lengths**2).sum()),
                      (*pad, key_mask))
    q, k, v = (torch.randn(c.batch, c.heads, c.seqlen, c.head_dim, **kw) for _ in range(3))
    if c.kind == "order":
        # SemAIM: a random autoregression order per image; the cls token (rank -1) is seen by every token.
        # Content stream: i sees j iff order[j] <= order[i]; query stream (strict, queries from the other stream's
        # positions, keys/values from the content stream): order[j] < order[i], the cls query sees nothing
        order = torch.rand(c.batch, c.seqlen, device=device)
        order[:, 0] = -1.0
        visible = int(_order_visibility(order, c.strict).sum())
        return Inputs(q, k, v, dict(order=order, strict=c.strict), visible, None)
    return Inputs(q, k, v, {}, c.batch * c.seqlen**2, None)


def _steps(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[str], Callable[[], object]]:
    """Provider factory: "fwd" runs ``forward``; "full" also back-propagates a fixed gradient into ``leaves``.
    The first call runs here, so that any failure becomes ProviderUnavailable with the reason."""
    def factory(mode: str) -> Callable[[], object]:
        try:
            out = forward()
            if mode == "fwd":
                return forward
            grad = torch.randn_like(out)

            def full():
                for leaf in leaves:
                    leaf.grad = None
                forward().backward(grad)
            full()
            return full
        except ProviderUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a backend refusing these inputs means "not available here"
            raise ProviderUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    return factory


def _unavailable(reason: str) -> Callable[[str], Callable[[], object]]:
    def factory(mode: str):
        raise ProviderUnavailable(reason)
    return factory


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().requires_grad_() for t in tensors]


def _sdpa_args(x: Inputs, c: Case):
    """SDPA's view of the case: dense tensors and a boolean mask (True = attend) or None."""
    if c.kind == "packed":
        *qkv, key_mask = x.padded
        return qkv, key_mask
    if c.kind == "order":   # what our sdpa backend passes: rows that see nothing may see themselves
        return [x.q, x.k, x.v], _order_mask(x.kwargs["order"], c.strict)[0]
    return [x.q, x.k, x.v], None


def _sdpa(x: Inputs, c: Case, backend_name: str | None):
    (q, k, v), mask = _sdpa_args(x, c)
    q, k, v = _leaves(q, k, v)

    def forward():
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _steps(forward, [q, k, v])


def _flex(x: Inputs, c: Case, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    if c.kind == "packed":
        cu = x.kwargs["cu_seqlens"].long()
        total = x.q.shape[0]
        sample_id = torch.bucketize(torch.arange(total, device=device), cu[1:], right=True)
        mask = create_block_mask(lambda b, h, qi, ki: sample_id[qi] == sample_id[ki], 1, None, total, total,
                                 device=device)
        q, k, v = _leaves(*(t.transpose(0, 1)[None] for t in (x.q, x.k, x.v)))  # [1, H, T, Dh]
    else:
        mask = None
        if c.kind == "order":
            order = x.kwargs["order"]
            visible = ((lambda b, h, qi, ki: order[b, ki] < order[b, qi]) if c.strict else
                       (lambda b, h, qi, ki: order[b, ki] <= order[b, qi]))
            mask = create_block_mask(visible, c.batch, None, c.seqlen, c.seqlen, device=device)
        q, k, v = _leaves(x.q, x.k, x.v)
    return _steps(lambda: compiled(q, k, v, block_mask=mask), [q, k, v])


def _xformers_import_error() -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install xformers; CUDA only)"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - broken install (ABI, CUDA runtime)
        return f"xformers not importable: {type(exc).__name__}: {str(exc)[:120]}"
    return None


def _xformers(x: Inputs, c: Case):
    why = _xformers_import_error()
    if why:
        return _unavailable(why)
    from xformers.ops import fmha, memory_efficient_attention

    if c.kind == "packed":
        bias = fmha.BlockDiagonalMask.from_seqlens(list(c.lengths))
        q, k, v = _leaves(*(t[None] for t in (x.q, x.k, x.v)))  # [1, T, H, Dh]
    else:
        bias = None
        if c.kind == "order":
            bias, _ = _xformers_order_bias(x.kwargs["order"], c.strict, c.heads, x.q.dtype)  # rows 8-aligned
        q, k, v = _leaves(*(t.transpose(1, 2) for t in (x.q, x.k, x.v)))  # [B, N, H, Dh]
    return _steps(lambda: memory_efficient_attention(q, k, v, attn_bias=bias), [q, k, v])


def _varlen(x: Inputs, c: Case):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        return _unavailable(f"torch.nn.attention.varlen missing: {exc}")
    cu = x.kwargs["cu_seqlens"]
    q, k, v = _leaves(x.q, x.k, x.v)
    return _steps(lambda: varlen_attn(q, k, v, cu, cu, c.seqlen, c.seqlen), [q, k, v])


def providers_for(c: Case, x: Inputs, device) -> dict:
    cuda = torch.device(device).type == "cuda"
    q, k, v = _leaves(x.q, x.k, x.v)
    qt, kt, vt = _leaves(x.q, x.k, x.v)
    triton_ok, why = triton_usable(torch.device(device))
    providers = {
        "reference": _steps(lambda: sparse_attention_ref(q, k, v, **x.kwargs), [q, k, v]),
        "sdpa": _sdpa(x, c, None),
    }
    for name, backend_name in SDPA_BACKENDS.items():
        providers[name] = _sdpa(x, c, backend_name) if cuda else _unavailable("needs CUDA")
    providers["flex"] = (_flex(x, c, device) if cuda else
                         _unavailable("FlexAttention is benchmarked on CUDA only (no CPU backward in torch)"))
    providers["xformers"] = (_xformers(x, c) if cuda else
                             _unavailable(_xformers_import_error() or "xformers attention is CUDA only"))
    if c.kind == "packed":
        providers["varlen"] = _varlen(x, c) if cuda else _unavailable("varlen_attn is CUDA only")
    providers["triton"] = (_steps(lambda: sparse_attention(qt, kt, vt, backend="triton", **x.kwargs), [qt, kt, vt])
                           if triton_ok else _unavailable(why))
    providers["auto"] = _auto(x, c)
    return providers


def _auto(x: Inputs, c: Case):
    qa, ka, va = _leaves(x.q, x.k, x.v)
    factory = _steps(lambda: attention(qa, ka, va, backend="auto", **x.kwargs), [qa, ka, va])

    def reporting(mode: str):
        before = set(auto_choices().items())
        step = factory(mode)
        for key, choice in set(auto_choices().items()) - before:
            print(f"[bench] {c.name} ({mode}): auto picked {choice!r} for {key}", file=sys.stderr)
        return step
    return reporting


def traffic_and_flops(c: Case, x: Inputs) -> tuple[dict, dict]:
    elems = x.q.numel()  # B*H*N*Dh (dense) or T*H*Dh (packed)
    e = x.q.element_size()
    fwd_bytes = 4 * elems * e
    bwd_bytes = 8 * elems * e
    fwd_flops = 4 * c.heads * c.head_dim * x.visible_pairs
    return {"fwd": fwd_bytes, "full": fwd_bytes + bwd_bytes}, {"fwd": fwd_flops, "full": 3.5 * fwd_flops}


def run(device, tiny: bool, *, warmup: int | None = None, rep: int | None = None,
        names: list[str] | None = None) -> list[Row]:
    """All rows on ``device``; ``tiny`` picks the small CPU cases (few repetitions: the interpreter is slow)."""
    warmup = (1 if tiny else 10) if warmup is None else warmup
    rep = (2 if tiny else 50) if rep is None else rep
    rows: list[Row] = []
    for c in cases(tiny):
        if names and c.name not in names:
            continue
        torch.manual_seed(0)
        x = make_inputs(c, device)
        bytes_moved, flops = traffic_and_flops(c, x)
        rows += bench("sparse_attention", c.name, providers_for(c, x, device), bytes_moved=bytes_moved,
                      flops=flops, modes=("fwd", "full"), device=device, warmup=warmup, rep=rep)
        del x
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    cli_main("sparse attention", __doc__.splitlines()[0], run,
             lambda roof: (f"measured copy bandwidth {roof['copy_gbps']:.1f} GB/s, {roof['matmul_dtype']} matmul "
                           f"{roof['matmul_tflops']:.2f} TFLOP/s; roofline = minimal time at those rates / "
                           "measured time"),
             select="names", flag="cases", argv=argv)

if __name__ == "__main__":
    main()
