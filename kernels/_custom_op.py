"""One way to register a kernel as a torch.library custom op, for every backend (Triton, CUDA extension).

An op is opaque to torch.compile (one ``sslpt::<name>`` graph node, no graph break) when it is a custom op with a
fake (meta) function, and differentiable when it has an autograd formula. ``define`` registers one op;
``define_with_grad`` registers a forward op and the op its backward calls, with the backward formula written
once and given the gradient op as its first argument, so that the Triton and CUDA bindings of an op share
fake functions, setup_context and backward and differ only in their kernels.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

NAMESPACE = "sslpt"


def define(name: str, forward: Callable, *, fake: Callable, backward: Optional[Callable] = None,
           setup_context: Optional[Callable] = None):
    """Register ``sslpt::<name>``: ``forward`` (type-annotated: the schema is inferred from it; no input is
    mutated), its fake function, and optionally its autograd formula ``backward(ctx, *grads)`` with
    ``setup_context(ctx, inputs, output)``. Returns the op (callable like ``forward``)."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", forward, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def define_with_grad(name: str, forward: Callable, grad: Callable, *, fake: Callable, grad_fake: Callable,
                     backward: Callable, setup_context: Callable, grad_name: Optional[str] = None):
    """Register ``sslpt::<name>`` and its gradient op ``sslpt::<grad_name>`` (default ``<name>_bwd``).

    ``backward(grad_op, ctx, *grads)`` is the autograd formula, given the registered gradient op first.
    Returns (forward op, gradient op)."""
    grad_op = define(grad_name or f"{name}_bwd", grad, fake=grad_fake)
    op = define(name, forward, fake=fake, backward=functools.partial(backward, grad_op), setup_context=setup_context)
    return op, grad_op
