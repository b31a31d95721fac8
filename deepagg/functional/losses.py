r"""Tuple losses for fine-tuning global descriptors: contrastive and triplet.

Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018 (the cirtorch
recipe). A training tuple is an anchor (query) descriptor, one matching (positive) descriptor and K non-matching
(negative) descriptors. A batch of T tuples is given as

- ``anchor`` :math:`(T, D)` and ``positive`` :math:`(T, D)`;
- ``negatives`` :math:`(T, K, D)`, K >= 0, padded when tuples have different numbers of negatives;
- ``neg_mask`` :math:`(T, K)` bool, True = a real negative, False = padding (``None``: every slot is real).

Padding is excluded by selection, never by multiplying with the mask: the values stored in padded slots never
reach the loss or its gradient (they may even be ``inf`` or ``nan``), and padded slots get a zero gradient.

Both losses return the **mean over tuples** of a per-tuple loss that sums over the tuple's real negatives, as a
0-dim tensor; T = 0 gives a zero that is still connected to the inputs' autograd graph. Computed in at least
float32 (half inputs are upcast) and returned in the dtype of ``anchor``. Both are dense tensor functions and
compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import torch

from deepagg._checks import check_dtype, check_floating, check_same_device, check_shape

__all__ = ["contrastive_loss", "triplet_loss"]


def _check_margin(value: object, *, name: str, fn: str) -> float:
    """``value`` as a float if it is a finite real number > 0 (bools and tensors are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        shown = f"{type(value).__name__} {value!r}" if not isinstance(value, (int, float)) else repr(value)
        raise ValueError(f"{fn}(): {name} must be a finite number > 0; got {shown}.")
    return float(value)


def _check_eps(value: object, *, fn: str) -> float:
    """``value`` as a float if it is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}(): eps must be a finite number >= 0; got {value!r}.")
    return float(value)


def _check_tuples(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_mask: torch.Tensor | None,
    fn: str,
) -> None:
    """Validate the metadata (types, shapes, dtypes, devices) of a batch of tuples; no host sync."""
    bound = check_shape(anchor, "T,D", name="anchor", fn=fn, hint="Pass one anchor descriptor per tuple, as rows.")
    check_shape(positive, "T,D", name="positive", fn=fn, sizes=bound, hint="Pass one positive per tuple.")
    bound = check_shape(
        negatives,
        "T,K,D",
        name="negatives",
        fn=fn,
        sizes=bound,
        hint="Pass K negatives per tuple, padded to a common K (see neg_mask).",
    )
    for name, t in (("anchor", anchor), ("positive", positive), ("negatives", negatives)):
        check_floating(t, name=name, fn=fn)
    if neg_mask is not None:
        check_shape(neg_mask, "T,K", name="neg_mask", fn=fn, sizes=bound, hint="True = a real negative.")
        check_dtype(neg_mask, (torch.bool,), name="neg_mask", fn=fn)
    check_same_device({"anchor": anchor, "positive": positive, "negatives": negatives, "neg_mask": neg_mask}, fn=fn)


def _prepare(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, neg_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The three inputs in a common dtype of at least float32, padded negatives replaced by the anchor."""
    dtype = torch.promote_types(torch.promote_types(anchor.dtype, positive.dtype), negatives.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    a, p, n = anchor.to(dtype), positive.to(dtype), negatives.to(dtype)
    if neg_mask is not None:
        # Selection, not multiplication: garbage (inf, nan) in the padding never enters the arithmetic, and the
        # padded slots get an exactly zero gradient.
        n = torch.where(neg_mask[..., None], n, a[:, None, :].detach())
    return a, p, n, neg_mask


def _sq_dist(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance ``||a - x||^2`` along the last dim (differences, not the Gram expansion)."""
    d = a - x
    return (d * d).sum(dim=-1)


def _mean_over_tuples(per_tuple: torch.Tensor) -> torch.Tensor:
    """The mean over the T tuples; 0 (still in the autograd graph) when T = 0."""
    return per_tuple.sum() / max(per_tuple.shape[0], 1)


def contrastive_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    margin: float = 0.7,
    neg_mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    r"""Contrastive loss of anchor-positive-negatives tuples, as in cirtorch.

    Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018 (after
    Chopra, Hadsell and LeCun, CVPR 2005). With the distance :math:`\mathcal{D}(a, x) = \sqrt{\|a - x\|^2 +
    \varepsilon}` (``eps`` keeps the gradient finite when :math:`a = x`), the loss of tuple t is

    .. math::
        \ell_t = \tfrac12 \mathcal{D}(a_t, p_t)^2
            + \tfrac12 \sum_k m_{tk} \max\bigl(0, \mathrm{margin} - \mathcal{D}(a_t, n_{tk})\bigr)^2,

    with :math:`m_{tk}` the mask (1 for a real negative, 0 for padding), and the result is the mean of
    :math:`\ell_t` over the T tuples. A negative farther than ``margin`` contributes 0; the positive term is
    :math:`\tfrac12 (\|a - p\|^2 + \varepsilon)`, i.e. :math:`\varepsilon / 2` for identical vectors.
    cirtorch's default margin for L2-normalised descriptors is 0.7 (VGG16/ResNet101 GeM).

    Args:
        anchor: Anchor (query) descriptors of shape :math:`(T, D)`, typically L2-normalised.
        positive: One positive per tuple, :math:`(T, D)`.
        negatives: Negatives of shape :math:`(T, K, D)`, K >= 0; padded slots are ignored (any values).
        margin: The hinge margin, a finite number > 0.
        neg_mask: Optional bool mask :math:`(T, K)`, True = a real negative; ``None`` means all are real.
        eps: Added to the squared distance before the square root, a finite number >= 0.

    Returns:
        The mean loss over tuples, a 0-dim tensor in the dtype of ``anchor`` (0 for T = 0, still differentiable).

    Raises:
        TypeError: If an input is not a tensor.
        ShapeError: If the shapes disagree (T, K or D) or an input has the wrong number of dims.
        DTypeError: If a descriptor tensor is not floating point or ``neg_mask`` is not bool.
        DeviceError: If the inputs are on different devices.
        ValueError: If ``margin`` or ``eps`` is out of range.

    Example:
        >>> a, p = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
        >>> n = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1)
        >>> contrastive_loss(a, p, n, margin=0.7).shape
        torch.Size([])
    """
    fn = "contrastive_loss"
    margin = _check_margin(margin, name="margin", fn=fn)
    eps = _check_eps(eps, fn=fn)
    _check_tuples(anchor, positive, negatives, neg_mask, fn)
    a, p, n, mask = _prepare(anchor, positive, negatives, neg_mask)
    pos_term = 0.5 * (_sq_dist(a, p) + eps)  # D(a, p)^2 without the square root
    sq_n = _sq_dist(a[:, None, :], n)  # (T, K)
    if mask is not None:
        # Padded slots measure 0 (the anchor stands in for them): give them a constant distance of 1 before the
        # square root, so that eps = 0 cannot put an infinite local derivative behind their zero gradient.
        sq_n = torch.where(mask, sq_n, torch.ones_like(sq_n))
    dist_n = torch.sqrt(sq_n + eps)
    hinge = torch.clamp(margin - dist_n, min=0.0)
    hinge = hinge * hinge
    if mask is not None:
        hinge = torch.where(mask, hinge, torch.zeros_like(hinge))
    per_tuple = pos_term + 0.5 * hinge.sum(dim=1)
    return _mean_over_tuples(per_tuple).to(anchor.dtype)


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    margin: float = 0.1,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Triplet (ranking) loss of anchor-positive-negatives tuples on squared distances, as in cirtorch.

    Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018 (after
    Schroff et al., "FaceNet", CVPR 2015). The loss of tuple t sums one hinge per real negative,

    .. math::
        \ell_t = \sum_k m_{tk} \max\bigl(0, \|a_t - p_t\|^2 - \|a_t - n_{tk}\|^2 + \mathrm{margin}\bigr),

    with :math:`m_{tk}` the mask (1 for a real negative, 0 for padding), and the result is the mean of
    :math:`\ell_t` over the T tuples. A tuple with no real negative (K = 0 or an all-False mask row) contributes 0.

    Args:
        anchor: Anchor (query) descriptors of shape :math:`(T, D)`, typically L2-normalised.
        positive: One positive per tuple, :math:`(T, D)`.
        negatives: Negatives of shape :math:`(T, K, D)`, K >= 0; padded slots are ignored (any values).
        margin: The hinge margin on squared distances, a finite number > 0.
        neg_mask: Optional bool mask :math:`(T, K)`, True = a real negative; ``None`` means all are real.

    Returns:
        The mean loss over tuples, a 0-dim tensor in the dtype of ``anchor`` (0 for T = 0, still differentiable).

    Raises:
        TypeError: If an input is not a tensor.
        ShapeError: If the shapes disagree (T, K or D) or an input has the wrong number of dims.
        DTypeError: If a descriptor tensor is not floating point or ``neg_mask`` is not bool.
        DeviceError: If the inputs are on different devices.
        ValueError: If ``margin`` is not a finite number > 0.

    Example:
        >>> a, p = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
        >>> n = torch.nn.functional.normalize(torch.randn(4, 5, 8), dim=-1)
        >>> triplet_loss(a, p, n, margin=0.1).shape
        torch.Size([])
    """
    fn = "triplet_loss"
    margin = _check_margin(margin, name="margin", fn=fn)
    _check_tuples(anchor, positive, negatives, neg_mask, fn)
    a, p, n, mask = _prepare(anchor, positive, negatives, neg_mask)
    d_pos = _sq_dist(a, p)  # (T,)
    d_neg = _sq_dist(a[:, None, :], n)  # (T, K)
    hinge = torch.clamp(d_pos[:, None] - d_neg + margin, min=0.0)
    if mask is not None:
        hinge = torch.where(mask, hinge, torch.zeros_like(hinge))
    return _mean_over_tuples(hinge.sum(dim=1)).to(anchor.dtype)
