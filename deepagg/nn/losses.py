"""Tuple loss modules for fine-tuning: contrastive and triplet (cirtorch recipe)."""

from __future__ import annotations

import torch
from torch import nn

from deepagg.functional.losses import _check_eps, _check_margin, contrastive_loss, triplet_loss

__all__ = ["ContrastiveLoss", "TripletLoss"]


class ContrastiveLoss(nn.Module):
    r"""Contrastive loss of anchor-positive-negatives tuples. See :func:`deepagg.functional.contrastive_loss`.

    Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018: the mean
    over tuples of :math:`\tfrac12 \mathcal{D}(a, p)^2 + \tfrac12 \sum_k \max(0, \mathrm{margin} -
    \mathcal{D}(a, n_k))^2` with :math:`\mathcal{D}(a, x) = \sqrt{\|a - x\|^2 + \varepsilon}`.

    Args:
        margin: The hinge margin, a finite number > 0 (cirtorch uses 0.7 for L2-normalised GeM descriptors).
        eps: Added to the squared distance before the square root, a finite number >= 0.

    Raises:
        ValueError: If ``margin`` or ``eps`` is out of range.

    Shape:
        - anchor: :math:`(T, D)`; positive: :math:`(T, D)`; negatives: :math:`(T, K, D)`;
          neg_mask (optional): :math:`(T, K)` bool, True = a real negative.
        - Output: a 0-dim tensor (the mean over tuples), in the dtype of ``anchor``.

    Example:
        >>> a, p = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
        >>> n = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1)
        >>> loss = ContrastiveLoss(margin=0.7)
        >>> loss, loss(a, p, n).shape
        (ContrastiveLoss(margin=0.7, eps=1e-12), torch.Size([]))
    """

    def __init__(self, margin: float = 0.7, eps: float = 1e-12) -> None:
        super().__init__()
        self.margin = _check_margin(margin, name="margin", fn="ContrastiveLoss")
        self.eps = _check_eps(eps, fn="ContrastiveLoss")

    def forward(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        neg_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean contrastive loss over the T tuples (0-dim)."""
        return contrastive_loss(anchor, positive, negatives, margin=self.margin, neg_mask=neg_mask, eps=self.eps)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, eps={self.eps}"


class TripletLoss(nn.Module):
    r"""Triplet loss of anchor-positive-negatives tuples. See :func:`deepagg.functional.triplet_loss`.

    The mean over tuples of :math:`\sum_k \max(0, \|a - p\|^2 - \|a - n_k\|^2 + \mathrm{margin})`.

    Args:
        margin: The hinge margin on squared distances, a finite number > 0.

    Raises:
        ValueError: If ``margin`` is not a finite number > 0.

    Shape:
        - anchor: :math:`(T, D)`; positive: :math:`(T, D)`; negatives: :math:`(T, K, D)`;
          neg_mask (optional): :math:`(T, K)` bool, True = a real negative.
        - Output: a 0-dim tensor (the mean over tuples), in the dtype of ``anchor``.

    Example:
        >>> a, p = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
        >>> n = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1)
        >>> loss = TripletLoss(margin=0.1)
        >>> loss, loss(a, p, n).shape
        (TripletLoss(margin=0.1), torch.Size([]))
    """

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = _check_margin(margin, name="margin", fn="TripletLoss")

    def forward(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        neg_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean triplet loss over the T tuples (0-dim)."""
        return triplet_loss(anchor, positive, negatives, margin=self.margin, neg_mask=neg_mask)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
