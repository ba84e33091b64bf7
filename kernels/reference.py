"""The pure-PyTorch references of every op, importable on their own::

    from sslpt.kernels.reference import info_nce_ref, patch_loss_ref

Each is the definition the kernels are tested against and what ``backend="reference"`` runs: plain torch
ops, differentiable by autograd, on any device. They compute in fp32 (float16 / bfloat16 inputs are upcast)
and in float64 for float64 inputs, so ``torch.autograd.gradcheck`` applies. They take the op's arguments
positionally after the public function's checks: call them with validated inputs (the public functions,
with ``backend="reference"``, check first and then call these).
"""
from .dense_match import dense_match_ref
from .embed_visible_patches import embed_visible_patches_ref
from .gather_tokens import gather_tokens_ref
from .hard_patch_masking import top_patches_ref
from .info_nce import info_nce_ref
from .nt_xent import nt_xent_ref
from .patch_loss import patch_loss_ref
from .prototype_cross_entropy import prototype_cross_entropy_ref
from .relative_loss import relative_loss_ref
from .scatter_tokens import scatter_tokens_ref
from .sparse_attention import sparse_attention_ref

__all__ = [
    "gather_tokens_ref", "scatter_tokens_ref", "embed_visible_patches_ref", "top_patches_ref",
    "patch_loss_ref", "relative_loss_ref", "info_nce_ref", "nt_xent_ref", "dense_match_ref", "sparse_attention_ref",
    "prototype_cross_entropy_ref",
]
