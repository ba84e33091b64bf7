"""Benchmark of DINO's multi-crop prototype cross-entropy (``prototype_cross_entropy``): reference against Triton.

Providers:
- "reference": the op's ``_ref`` (what DINO's code does, with the student log-softmax hoisted out of the teacher
  loop): [N, K] logits, log-softmax and teacher softmax materialised, computed in fp32.
- "triton": the public op with backend="triton": the logits never leave the chip; O(N d) saved for the backward.
Leaves: the student features and the (effective) student prototypes, as in training with a trainable last layer.

Modes "fwd" and "full" (forward + backward). FLOPs are the minimal dense work of the loss: the forward's student
logits (2 N_s K d), teacher logits and U = p Ws (2 x 2 N_t K d); the backward's d student and d prototypes
(2 x 2 N_s K d, the teacher side needs none). The Triton backward recomputes the student logits twice (in the
d student pass and in the d prototypes pass), so its roofline fraction is conservative.

Shapes: DINO's ViT-S/16 at a global batch of 1024 on one device (2+10 crops, K = 65,536, d = 256, bf16) and
one GPU's share of DINO's default (B = 64); a tiny fp32 case on CPU (Triton under the interpreter: plumbing only).
``--saved-memory`` prints instead what each provider keeps for the backward (bytes of the tensors autograd
saves, measured with saved-tensor hooks), at B = 64, 2+10 crops, K = 8192, d = 256 by default: on a CPU, where
no peak is measured, that is the memory the loss holds between forward and backward.

    python -m benchmarks.bench_dino_loss [--device cuda] [--json out.json]
    python -m benchmarks.bench_dino_loss --saved-memory [--batch 64 --protos 8192 --dim 256]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from benchmarks.harness import Row, bench, cli_main, guard_triton, loss_steps
from sslpt.kernels.prototype_cross_entropy import prototype_cross_entropy, prototype_cross_entropy_ref

FAMILIES = ("dino_loss",)
PROVIDERS = ("reference", "triton")
NUM_GLOBAL, STUDENT_TEMP, TEACHER_TEMP = 2, 0.1, 0.04


@dataclass(frozen=True)
class Shape:
    batch: int
    crops: int
    protos: int
    dim: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"B{self.batch} 2+{self.crops - NUM_GLOBAL} K{self.protos} d{self.dim} {str(self.dtype)[6:]}"


def shapes(tiny: bool) -> list[Shape]:
    if tiny:
        return [Shape(2, 6, 64, 16, torch.float32)]
    return [Shape(1024, 12, 65536, 256, torch.bfloat16), Shape(64, 12, 65536, 256, torch.bfloat16)]


def make_inputs(s: Shape, device) -> dict:
    """Unit-norm features (DINO's L2-normalised bottleneck) and unit prototypes, a centre; leaves require grad."""
    def unit(rows: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(rows, s.dim, device=device), dim=-1).to(s.dtype)

    return {"student": unit(s.crops * s.batch).requires_grad_(), "teacher": unit(NUM_GLOBAL * s.batch),
            "student_weight": unit(s.protos).requires_grad_(), "teacher_weight": unit(s.protos),
            "center": 0.1 * torch.randn(s.protos, device=device)}


def _reference(x: dict) -> torch.Tensor:
    return prototype_cross_entropy_ref(x["student"], x["teacher"], x["student_weight"], x["teacher_weight"],
                                       x["center"], STUDENT_TEMP, TEACHER_TEMP, NUM_GLOBAL, "cross")


def _triton(x: dict) -> torch.Tensor:
    return prototype_cross_entropy(x["student"], x["teacher"], x["student_weight"], x["teacher_weight"], x["center"],
                                   student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP, num_global=NUM_GLOBAL,
                                   backend="triton")


def flops(s: Shape) -> dict:
    n_s, n_t, kd = s.crops * s.batch, NUM_GLOBAL * s.batch, s.protos * s.dim
    forward = 2 * n_s * kd + 4 * n_t * kd
    return {"fwd": forward, "full": forward + 4 * n_s * kd}


def run(device, tiny: bool, *, warmup: int | None = None, rep: int | None = None, families=FAMILIES) -> list[Row]:
    """All rows on ``device``; ``tiny`` picks the small CPU shape (and few repetitions)."""
    warmup = warmup if warmup is not None else (1 if tiny else 10)
    rep = rep if rep is not None else (2 if tiny else 50)
    rows: list[Row] = []
    for s in shapes(tiny):
        rows += bench("dino_loss", s.name, _providers(make_inputs(s, device), device), flops=flops(s),
                      modes=("fwd", "full"), device=device, warmup=warmup, rep=rep)
    return rows


def _providers(x: dict, device) -> dict:
    leaves = [x["student"], x["student_weight"]]
    return {"reference": loss_steps(lambda: _reference(x), leaves),
            "triton": guard_triton(device, loss_steps(lambda: _triton(x), leaves))}


def saved_bytes(forward, inputs: dict) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of ``forward(inputs)`` (leaves excluded:
    the caller holds them anyway)."""
    leaves = {t.data_ptr() for t in inputs.values() if isinstance(t, torch.Tensor)}
    saved: dict = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in leaves:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(inputs)
    return sum(saved.values())


def saved_memory_report(batch: int, crops: int, protos: int, dim: int, device: str = "cpu") -> str:
    s = Shape(batch, crops, protos, dim, torch.float32)
    x = make_inputs(s, device)
    lines = [f"saved for backward at {s.name} (student [{crops * batch}, {dim}], K = {protos}):"]
    for name, forward in (("reference", _reference), ("triton", _triton)):
        nbytes = saved_bytes(forward, x)
        lines.append(f"  {name:9s} {nbytes / 2**20:10.2f} MiB")
    logits = crops * batch * protos * 4
    lines.append(f"  (one fp32 [N_s, K] logit tensor: {logits / 2**20:.2f} MiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--saved-memory" in argv:
        parser = argparse.ArgumentParser(description="what the DINO loss keeps for its backward")
        parser.add_argument("--saved-memory", action="store_true")
        parser.add_argument("--batch", type=int, default=64)
        parser.add_argument("--crops", type=int, default=12)
        parser.add_argument("--protos", type=int, default=8192)
        parser.add_argument("--dim", type=int, default=256)
        parser.add_argument("--device", default="cpu")
        args = parser.parse_args(argv)
        print(saved_memory_report(args.batch, args.crops, args.protos, args.dim, args.device))
        return
    cli_main("DINO prototype cross-entropy", __doc__.splitlines()[0], run,
             lambda roof: (f"measured {roof['matmul_dtype']} matmul {roof['matmul_tflops']:.2f} TFLOP/s; roofline = "
                           "time at that rate for the minimal FLOPs / measured time; peak MiB = extra memory of "
                           "one step"),
             choices=FAMILIES, argv=argv)


if __name__ == "__main__":
    main()
