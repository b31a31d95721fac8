"""Descriptor normalisation: L2 and signed power normalisation."""

from __future__ import annotations

import torch

from deepagg._checks import check_floating, check_positive, check_shape

__all__ = ["l2n", "power_norm"]


def l2n(x: torch.Tensor, *, eps: float = 1e-6, dim: int = -1) -> torch.Tensor:
    r"""L2-normalise along ``dim``: :math:`x / \max(\|x\|_2, \epsilon)`.

    A zero vector stays zero (its norm is floored at ``eps``); gradients are finite everywhere. The norm is
    computed in at least float32 (a float16 row with norm above 65504 would otherwise normalise to zeros) and
    the output has the input dtype.

    Args:
        x: Descriptors, e.g. of shape :math:`(B, D)`; any rank >= 1.
        eps: Floor of the norm, > 0.
        dim: The dimension to normalise.

    Returns:
        A tensor of the shape and dtype of ``x`` with unit rows.

    Raises:
        DTypeError: If ``x`` is not floating point.
        ValueError: If ``eps`` is not positive.

    Example:
        >>> l2n(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        check_shape(x, "B,D", name="x", fn="l2n", hint="Pass a tensor with at least one dimension.")
    check_floating(x, name="x", fn="l2n")
    check_positive(eps, name="eps", fn="l2n")
    if x.dtype in (torch.float32, torch.float64):
        return torch.nn.functional.normalize(x, p=2.0, dim=dim, eps=eps)
    return torch.nn.functional.normalize(x.float(), p=2.0, dim=dim, eps=eps).to(x.dtype)


def power_norm(x: torch.Tensor, *, alpha: float = 0.5, eps: float = 1e-12) -> torch.Tensor:
    r"""Signed power normalisation: :math:`\mathrm{sign}(x) \max(|x|, \epsilon)^\alpha`.

    The base is clamped at ``eps`` before the power so the gradient is finite at 0 (where the output is
    exactly 0, since ``sign(0) = 0``). ``alpha = 0.5`` is the signed square root of HeWR and Hoang et al.
    Computed in at least float32; the output has the input dtype.

    Args:
        x: Any floating tensor, e.g. descriptors :math:`(B, D)`.
        alpha: The exponent, > 0.
        eps: Clamp floor of :math:`|x|`.

    Returns:
        A tensor of the shape and dtype of ``x`` (not re-normalised).

    Raises:
        DTypeError: If ``x`` is not floating point.
        ValueError: If ``alpha`` is not positive.

    Example:
        >>> power_norm(torch.tensor([[-4.0, 0.0, 9.0]]))
        tensor([[-2.,  0.,  3.]])
    """
    if not isinstance(x, torch.Tensor):
        check_shape(x, "B,D", name="x", fn="power_norm")
    check_floating(x, name="x", fn="power_norm")
    check_positive(alpha, name="alpha", fn="power_norm")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xf = x.to(dtype)
    return (torch.sign(xf) * xf.abs().clamp(min=eps).pow(alpha)).to(x.dtype)
