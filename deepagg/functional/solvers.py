r"""Iterative linear solvers: batched conjugate gradient for symmetric positive definite systems.

:func:`conjugate_gradient` solves :math:`A x = b` for every column of ``b`` at once, with ``A`` given only by a
function that multiplies it with a block of columns (a sparse matrix product, a graph Laplacian, a
block-diagonal set of per-query sub-graphs). Each column runs its own CG recurrence (its own step sizes), so
the result for a column does not depend on the other columns. The loop runs a fixed number of iterations with
per-column convergence masks, and never synchronises with the device inside the loop.

A column whose relative residual never falls to ``tol`` returns the iterate with the smallest residual norm
seen (the initial zero vector included), as MATLAB's ``pcg`` does when it does not converge: at the diffusion
setting of Iscen et al. (alpha = 0.99, 20 iterations, tol 1e-6) no column converges, and this rule decides
the scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deepagg._checks import ShapeError, check_floating, check_int

__all__ = ["conjugate_gradient"]


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    max_iter: int = 20,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Solve :math:`A x = b` by conjugate gradient, batched over the columns of ``b``.

    ``A`` must be symmetric positive definite; it is given by ``matvec(X) = A @ X`` for a block ``X`` of shape
    :math:`(N, Q)`. Starting from :math:`x_0 = 0`, each column runs the textbook CG recurrence (Hestenes and
    Stiefel) for at most ``max_iter`` iterations. A column is converged once its recurrence residual satisfies
    :math:`\|r\| \le \mathrm{tol}\,\|b\|` (relative to that column's right-hand side); from then on its iterate
    is frozen (its step size is 0). A column that never converges returns the iterate whose residual norm was
    the smallest, which is the last one unless the residual went up at the end (MATLAB ``pcg``'s rule). A zero
    column of ``b`` returns zeros. There is no host synchronisation inside the loop: the fixed budget is run
    in full (``matvec`` is called exactly ``max_iter`` times), so the solver is traceable and GPU-friendly.
    The iteration runs without autograd (in place, fused ops): the solution carries no gradient.

    Args:
        matvec: Function mapping an :math:`(N, Q)` tensor to ``A`` times it, same shape, dtype and device.
        b: Right-hand sides :math:`(N, Q)`, or a single one of shape :math:`(N,)`. Floating point.
        max_iter: Iteration budget, an int >= 0 (0 returns zeros).
        tol: Relative residual tolerance, a float >= 0.

    Returns:
        ``(solution, residual_norms)``: the solution with the shape of ``b``, and the recurrence residual norm
        :math:`\|b - A x\|` of each returned column, shape ``b.shape[1:]`` (a 0-d tensor for a 1-D ``b``).

    Raises:
        ShapeError: If ``b`` is not 1-D or 2-D, or ``matvec`` returns another shape.
        DTypeError: If ``b`` is not floating point.
        ValueError: If ``max_iter < 0`` or ``tol`` is negative or NaN.

    Example:
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, res = conjugate_gradient(lambda v: a @ v, torch.tensor([1.0, 2.0], dtype=torch.float64), max_iter=2)
        >>> torch.allclose(a @ x, torch.tensor([1.0, 2.0], dtype=torch.float64)), bool(res < 1e-12)
        (True, True)
    """
    fn = "conjugate_gradient"
    if not isinstance(b, torch.Tensor) or b.ndim not in (1, 2):
        got = f"shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
        raise ShapeError(f"{fn}(): b must have shape (N,) or (N, Q); got {got}.", "(N,) or (N, Q)", got)
    check_floating(b, name="b", fn=fn)
    max_iter = check_int(max_iter, name="max_iter", fn=fn, minimum=0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ValueError(f"{fn}(): tol must be a finite float >= 0 (relative to each column's ||b||); got {tol!r}.")
    single = b.ndim == 1
    rhs = b[:, None] if single else b

    def apply(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v)
        if not isinstance(out, torch.Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeError(
                f"{fn}(): matvec must return a tensor of the shape of its input {tuple(v.shape)}; got {got}.",
                tuple(v.shape),
                got,
            )
        return out

    with torch.no_grad():
        # Each column is solved for b / ||b|| and rescaled: the recurrence works with squared norms, which would
        # underflow or overflow for float32 columns of norm below ~1e-19 or above ~1e19.
        scale = torch.linalg.vector_norm(rhs, dim=0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        r = rhs / scale  # a new tensor: the residual starts as the scaled right-hand side (x0 = 0)
        x = torch.zeros_like(r)
        p = r.clone()
        ones = torch.ones(1, r.shape[0], dtype=r.dtype, device=r.device)

        def coldot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            # Column dot products as one GEMV (a reduction over dim 0 of an (N, Q) block is slower on CPU).
            return (ones @ (a * b))[0]

        rr = coldot(r, r)  # (Q,) squared residual norms
        threshold = (tol * rr.sqrt()) ** 2  # converged when rr <= (tol ||b||)^2
        best_x = x.clone()
        best_rr = rr.clone()
        alive = rr > threshold  # not converged (yet)
        for it in range(max_iter):
            ap = apply(p)
            pap = coldot(p, ap)
            # A column steps while alive and pap > 0 (pap <= 0 only for a zero direction or an A that is not SPD).
            # Divisions by a frozen column's 0 are discarded by the where (no NaN reaches a result).
            active = alive & (pap > 0)
            step = torch.where(active, rr / pap, 0.0)
            x.addcmul_(step, p)
            r.addcmul_(step, ap, value=-1.0)
            rr_new = torch.where(active, coldot(r, r), rr)  # a frozen column keeps its rr exactly
            # best_x <- x where better: lerp with weight 0 or 1 is exact (weight 1 gives x itself) and, unlike
            # torch.where with a broadcast column mask, runs at copy speed. A frozen column is never better: its rr
            # is already among those best_rr has seen.
            better = rr_new < best_rr
            torch.lerp(best_x, x, better.to(x.dtype), out=best_x)
            best_rr = torch.where(better, rr_new, best_rr)
            alive = active & (rr_new > threshold)
            if it + 1 < max_iter:  # the last direction would go unused
                beta = torch.where(active, rr_new / rr, 0.0)  # an active column has rr > threshold >= 0
                torch.addcmul(r, p, beta, out=p)  # p <- r + beta p, one pass
            rr = rr_new
    # A converged column's best iterate is its last one (its residual is the smallest so far and frozen).
    residual = best_rr.sqrt() * scale
    best_x = best_x.mul_(scale)  # best_x is the solver's own tensor
    if single:
        return best_x[:, 0], residual[0]
    return best_x, residual
