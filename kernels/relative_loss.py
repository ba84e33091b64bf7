"""HPM's relative loss-prediction objective (``forward_learning_loss``, relative=True).

For each image and each ordered pair (j, k) of its masked patches, with predicted
scores p and true (detached) losses t:
    z = p_k - p_j,  y+ = [t_k > t_j],  y- = [t_k < t_j]   (ties and j == k excluded)
    stable:   l_jk = y+ * softplus(-z) + y- * softplus(z)          (BCE with logits)
    official: l_jk = -y+ * log(sigmoid(z) + 1e-6) - y- * log(1 - sigmoid(z) + 1e-6)
    loss = sum(l) / sum(y+ + y-)      over the whole batch
The (j, k) and (k, j) terms are equal, so kernels may sum one triangle and double it.
Gradient of the stable form: dl/dp_k = sigmoid(z) - y+ summed over j with y+ + y- = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import dispatch
from ._validate import FLOAT_DTYPES, check_shape, check_tensor


def relative_loss_ref(pred_score: torch.Tensor, true_loss: torch.Tensor, stable: bool) -> torch.Tensor:
    p = pred_score.float()
    t = true_loss.detach().float()
    z = p.unsqueeze(1) - p.unsqueeze(2)               # z[b, j, k] = p_k - p_j
    pos = (t.unsqueeze(1) > t.unsqueeze(2)).float()   # t_k > t_j
    neg = (t.unsqueeze(1) < t.unsqueeze(2)).float()
    if stable:
        terms = pos * F.softplus(-z) + neg * F.softplus(z)
    else:
        s = torch.sigmoid(z)
        terms = -pos * torch.log(s + 1e-6) - neg * torch.log(1 - s + 1e-6)
    return terms.sum() / (pos + neg).sum().clamp_min(1.0)


_IMPLS = {"reference": relative_loss_ref}


def relative_loss(pred_score: torch.Tensor, true_loss: torch.Tensor, *, stable: bool = True,
                  backend: str | None = None) -> torch.Tensor:
    """Pairwise ranking (RankNet) loss between predicted and true per-patch losses.

    Args:
        pred_score: [B, M] predicted scores of each image's M masked patches.
        true_loss: [B, M] their reconstruction losses; treated as a constant.
        stable: softplus (BCE-with-logits) form; False reproduces the official code's
            ``log(sigmoid + 1e-6)``, which saturates for badly mis-ordered pairs.
    Returns:
        fp32 scalar; 0 when no pair has distinct true losses.
    """
    check_tensor("pred_score", pred_score, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("true_loss", true_loss, dtypes=FLOAT_DTYPES, device=pred_score.device)
    check_shape("true_loss", true_loss, pred_score.shape)
    impl = dispatch("relative_loss", backend, pred_score.device, _IMPLS)
    return impl(pred_score, true_loss.detach(), bool(stable))
