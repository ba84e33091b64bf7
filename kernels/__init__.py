"""Fast, drop-in ops for self-supervised visual pre-training.

Every op has a pure-PyTorch reference (the truth and the CPU path) and faster
backends chosen by ``backend="auto"`` (see ``kernels._backend``). Nothing here touches
CUDA at import time.
"""
from ._backend import BACKENDS, BackendUnavailable, get_backend, set_backend, use_backend
from ._validate import set_index_checks
from . import reference  # the *_ref functions: sslpt.kernels.reference
from .attention import ATTENTION_BACKENDS, attention, check_attention_backend
from .dense_match import dense_match
from .embed_visible_patches import embed_visible_patches
from .gather_tokens import gather_tokens
from .hard_patch_masking import hard_patch_masking
from .info_nce import info_nce
from .masking import Masking, block_wise_masking, inverse_block_masking, random_masking
from .nt_xent import nt_xent
from .patch_loss import patch_loss
from .patchify import patchify, unpatchify
from .prototype_cross_entropy import prototype_center, prototype_cross_entropy
from .relative_loss import relative_loss
from .scatter_tokens import scatter_tokens
from .sparse_attention import sparse_attention

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend", "set_index_checks",
    "Masking", "random_masking", "hard_patch_masking", "inverse_block_masking", "block_wise_masking",
    "gather_tokens", "scatter_tokens", "patchify", "unpatchify", "embed_visible_patches",
    "patch_loss", "relative_loss", "info_nce", "nt_xent", "dense_match", "sparse_attention",
    "prototype_cross_entropy", "prototype_center",
    "attention", "ATTENTION_BACKENDS", "BackendUnavailable", "check_attention_backend",
    "reference",
]
