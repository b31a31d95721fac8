r"""Heat-equation feature weighting (HeW) and heat re-ranking (HeR), batched, exact and differentiable.

Ma, Ruan, Zhu, Hui, "Deep feature aggregation and image re-ranking with heat diffusion for image retrieval",
IEEE TMM 2018 (``heat-diffusion-hew-her.txt``, sections III and IV).

**The one system behind everything.** For a graph with symmetric non-negative affinities ``A`` (zero diagonal)
and a ground conductance ``c > 0``, both HeW and HeR need the grounded Laplacian

.. math:: K = \mathrm{diag}(A\mathbf{1} + c) - A,

which is symmetric positive definite (strictly diagonally dominant), so it is factorised by Cholesky, never by
a general inverse or a batched LU (which MKL breaks after ``torch.set_num_threads``: ``environment.md``).

*HeW, ``variant="paper"``* (design.md 3.2): with :math:`P` the cosine affinities and
:math:`M = I - \mathrm{diag}(a)^{-1}P`, :math:`a = P\mathbf{1} + \lambda`, we have
:math:`M^{-1} = K^{-1}\mathrm{diag}(a)` with :math:`c = \lambda`, and :math:`K\mathbf{1} = \lambda\mathbf{1}`. So the
column sums of :math:`M^{-1}` are :math:`a_l/\lambda` and eq. 13 collapses to

.. math:: \psi_l = \frac{1}{\lambda\,(K^{-1})_{ll}}, \qquad w_l = 1/\psi_l = \lambda\,(K^{-1})_{ll} \in (0, 1].

Only the diagonal of :math:`K^{-1}` is needed. With unit features :math:`U` (n x C) and
:math:`E = \mathrm{diag}(U U^\top \mathbf{1} + \lambda)`, :math:`K = E - U U^\top` has rank-C structure; Woodbury
with :math:`Z = E^{-1/2} U` and the C x C matrix :math:`G = I - Z^\top Z` (SPD iff K is) gives
:math:`(K^{-1})_{ll} = (1 + z_l^\top G^{-1} z_l)/E_l`: :math:`O(nC^2)` instead of :math:`O(n^3)`. With
:math:`G^{-1} = M^\top M` (M the inverse Cholesky factor, lower triangular, ``_spd.py``),
:math:`z_l^\top G^{-1} z_l = \lVert M z_l \rVert^2`. Both products, :math:`Z^\top Z` and :math:`M Z^\top`, are
computed by lower block rows only (``GRAM_BLOCKS = 4``: 5/8 of the full products' work), so the path does
:math:`2.5nC^2` multiply-adds where ``Z^T Z`` and ``G^{-1} Z^T`` do :math:`4nC^2`.

*HeW, ``variant="hewr"``* (the authors' MATLAB ``Weight_Heat.m``/``get_potential_inv.m``): the affinity is
thresholded, so it has no low-rank structure and the dense n x n path is the only exact one (it costs
:math:`O(n^3)`: at n = 3072 about 20 times the Woodbury path of ``"paper"``, see ``benchmarks/bench_heat.py``).
The authors invert :math:`L = I - \mathrm{diag}(a)^{-1}A` (ground row removed, :math:`a = A\mathbf{1} + Z`);
:math:`L^{-1} = K^{-1}\mathrm{diag}(a)`, so their potential ``(colsum(Linv) - diag(Linv)) / diag(Linv) / (n+1)``
equals :math:`\sum_{m \ne l} (K^{-1})_{ml} / (K^{-1})_{ll} / (n+1)`. Since :math:`K\mathbf{1} = Z\mathbf{1}`,
:math:`\sum_m (K^{-1})_{ml} = 1/Z`: the potential needs only :math:`\mathrm{diag}(K^{-1})` too, the same
quantity as ``"paper"``, from the dense inverse Cholesky factor (``_spd.inverse_diagonal``: about
:math:`2n^3/3` multiply-adds, a third of an explicit inverse's :math:`2n^3`).

*HeR* (both variants): the query is the heat source of a (k+1)-node graph; its k database nodes have
:math:`\mu = K_{dd}^{-1} A_{dq}` with :math:`K_{dd} = \mathrm{diag}(A_{d\cdot}\mathbf{1} + c) - A_{dd}` (eq. 14;
the authors' "query column of the inverse of the grounded Laplacian" is this vector times a positive constant,
so it ranks identically). One (k+1) x (k+1) Cholesky factorisation and one triangular solve per query.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from deepagg._checks import check_dtype, check_floating, check_int, check_same_device, check_shape
from deepagg.functional._blocking import blocked, fill_padding, weighted_sums
from deepagg.functional._spd import (
    block_edges,
    cholesky_blocks_,
    forward_substitute_,
    inverse_cholesky_factor,
    inverse_diagonal,
    lower_gram,
)
from deepagg.functional.pooling import _check_maps
from deepagg.functional.qe import _compute_dtype

__all__ = ["heat_rerank", "hew", "hew_weights"]

VARIANTS = ("paper", "hewr")
METHODS = ("auto", "cholesky", "woodbury")
HEWR_THRESHOLD = 0.1
#: Row blocks of the lower-triangle Gram and triangular products: (b + 1) / (2b) of a full product's work.
GRAM_BLOCKS = 4
#: Bytes of map per block of images for the Woodbury path of "paper" on CPU (other paths: ``_blocking``'s 4 MiB):
#: its C x C factorisations batch over the block's images. Ad-hoc timings (2 Intel cores, 2026-12-02) of 4, 8,
#: 16, 32 and 64 MiB: 16 fastest at 8 x 512 x 24 x 32 (24 against 28 ms), 8 x 512 x 48 x 64 (81 against 90) and
#: 32 x 512 x 24 x 32 (100 against 110).
WOODBURY_BLOCK_BYTES = 16 * 2**20


def _check_positive(value: float, name: str, fn: str) -> float:
    """``value`` as a float if it is a finite number > 0 (bools refused), else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{fn}(): {name} must be a finite float > 0; got {value!r}.")
    return float(value)


def _check_variant(variant: str, fn: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"{fn}(): variant must be one of {VARIANTS}; got {variant!r}.")
    return variant


def _inv_norms(f: torch.Tensor, keep: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """``1 / ||f_l||`` of the columns of ``f`` (B, C, n) where ``keep`` and the norm is > 0, else exactly 0.

    Safe gradients: the rsqrt never sees a zero. Columns are reduced over C in the contiguous (B, C, n) layout
    of the feature maps (reducing the transposed (B, n, C) view, or ``vector_norm`` over dim 1, was 5-7x
    slower). Without autograd the squares go to ``buf`` (a work buffer the caller reuses afterwards).
    """
    sq = (f * f).sum(1) if buf is None else torch.mul(f, f, out=buf).sum(1)
    ok = keep & (sq > 0)
    return torch.where(ok, torch.rsqrt(torch.where(ok, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _auto_method(n: int, c: int, grad: bool) -> str:
    r"""The faster exact path of ``variant="paper"`` for n positions and C channels.

    With autograd, by flop count: dense, half the Gram :math:`n^2C` + the inverse Cholesky factor
    :math:`\approx 2n^3/3`; Woodbury: :math:`2.5nC^2 + 2C^3/3` (both as computed below, with the blocked
    lower-triangle products). Without autograd (the in-place Woodbury path, about half the factor's products) by
    the measured crossover, Woodbury from n = C on: ad-hoc timings on 2 Intel cores (2026-12-02) of both paths at
    C = 256 (n = 192 / 256 / 320: 6.1 / 6.3 / 5.3 ms against 4.3 / 7.8 / 10.8), C = 512 (n = 480 / 576 / 672: 23.3
    / 26.3 / 28.4 against 22.4 / 33.8 / 42.5) and C = 1280 (n = 768 / 1280: 79 / 117 against 38 / 130); the flop
    counts put the crossover near n = 1.4 C.
    """
    if not grad:
        return "woodbury" if n >= c else "cholesky"
    return "woodbury" if 2.5 * n * c * c + 2 * c**3 / 3 < n * n * c + 2 * n**3 / 3 else "cholesky"


def _block_bytes(x: torch.Tensor, variant: str, method: str) -> int | None:
    """:data:`WOODBURY_BLOCK_BYTES` where the Woodbury path of "paper" runs, else None (``_blocking``'s default)."""
    c, n = x.shape[1], x.shape[2] * x.shape[3]
    grad = x.requires_grad and torch.is_grad_enabled()
    woodbury = method == "woodbury" or (method == "auto" and _auto_method(n, c, grad) == "woodbury")
    return WOODBURY_BLOCK_BYTES if variant == "paper" and woodbury else None


def _paper_weights(f: torch.Tensor, valid: torch.Tensor, lam: float, method: str) -> torch.Tensor:
    """``w = lam * diag(K^-1)`` on the valid non-zero positions (0 elsewhere); f: (B, C, n) features."""
    c, n = f.shape[-2], f.shape[-1]
    if method == "auto":
        method = _auto_method(n, c, f.requires_grad)
    grad = f.requires_grad
    # Without autograd one map-sized work buffer serves the squares and then the scaled features: every fresh
    # map-sized allocation costs page faults on a CPU (glibc hands buffers this large back to the OS).
    buf = None if grad else torch.empty_like(f)
    inv = _inv_norms(f, valid, buf)  # (B, n); 0 marks a masked or zero feature: it takes no part
    ok = inv > 0
    # E_l = a_l + 1 = u_l . (sum_m u_m) + lam (the self term u_l.u_l = 1 of the Gram matrix is inside it).
    total = f @ inv[..., None]  # (B, C, 1) = sum_m u_m
    e = torch.where(ok, inv * (total.mT @ f)[:, 0] + lam, torch.ones_like(inv))
    if method == "woodbury":
        scale = (inv * torch.rsqrt(e))[:, None]
        zt = f * scale if buf is None else torch.mul(f, scale, out=buf)  # (B, C, n), column l = u_l / sqrt(E_l)
        g = _lower_minus_gram(zt, 1.0, grad)  # G = I - Z^T Z, lower block triangle
        if grad:
            m = inverse_cholesky_factor(g)  # G^-1 = M^T M, M lower triangular
            # z_l^T G^-1 z_l = ||M z_l||^2; block row i of M is 0 right of its diagonal block (5/8 of a product).
            quad = torch.ones_like(e)
            for a, b in itertools.pairwise(block_edges(c, GRAM_BLOCKS)):
                y = m[..., a:b, :b] @ zt[..., :b, :]
                quad = quad + (y * y).sum(-2)
        else:
            # Without autograd, in place: G = L L^T by block recursion and z_l^T G^-1 z_l = ||L^-1 z_l||^2 by block
            # forward substitution on Z itself: half the products of forming M (ad-hoc timing at 8 x 512 x 24 x 32:
            # 24 against 29 ms for the weights).
            y = forward_substitute_(cholesky_blocks_(g), zt)
            quad = y.mul_(y).sum(-2).add_(1.0)
        d = quad / e  # (1 + z^T G^-1 z) / E
    else:
        ut = f * inv[:, None] if buf is None else torch.mul(f, inv[:, None], out=buf)
        d = inverse_diagonal(_lower_minus_gram(ut.mT, e, grad))  # K = E - U U^T
    return torch.where(ok, lam * d, torch.zeros_like(d))


def _lower_minus_gram(z: torch.Tensor, diag: torch.Tensor | float, grad: bool) -> torch.Tensor:
    """``diag(diag) - Z Z^T`` of ``z`` (B, m, C), lower block triangle only (see :func:`lower_gram`)."""
    gram = lower_gram(z, GRAM_BLOCKS)
    if grad:
        d = torch.as_tensor(diag, dtype=z.dtype, device=z.device)
        return torch.diag_embed(d.expand(gram.shape[:-1])) - gram
    gram.neg_().diagonal(dim1=-2, dim2=-1).add_(diag)
    return gram


def _hewr_weights(
    f: torch.Tensor, valid: torch.Tensor, lam: float, center: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """The authors' potential, inverted; f: (B, C, n) uncentred features."""
    grad = f.requires_grad or (center is not None and center.requires_grad)
    n_valid = valid.sum(-1, keepdim=True).to(f.dtype)
    fc = f if center is None else f - center.to(f.dtype)[:, None]
    # Masked positions get u = 0, so no affinity (the where, not the product: NaN padding times 0 is NaN).
    ut = torch.where(valid[:, None], fc * _inv_norms(fc, valid)[:, None], 0.0)
    # Keep the affinities >= threshold and > 0 (F.threshold keeps x > t: t is the float just below threshold).
    keep_above = _below(threshold, f.dtype) if threshold > 0 else 0.0
    a = torch.nn.functional.threshold(ut.mT @ ut, keep_above, 0.0, inplace=not grad)
    a.diagonal(dim1=-2, dim2=-1).zero_()
    # The block between positions whose uncentred channel sum is 0 is zeroed (a rank-1 mask).
    zero = (f.sum(1) == 0).to(f.dtype)
    outer = torch.baddbmm(torch.ones_like(a[:, :1, :1]), zero[..., :, None], zero[..., None, :], alpha=-1)
    a = a * outer if grad else a.mul_(outer)
    del outer
    # The count of positive affinities (a >= 0 here) as a sum of signs: count_nonzero was 4x slower on CPU (ad hoc).
    positive = torch.sign(a.detach()).sum((-2, -1))
    # Ground conductance Z = lam * mean of the positive affinities; an image without any keeps Z = lam (then
    # every node is isolated and the weights below do not depend on Z).
    zc = torch.where(positive > 0, lam * a.sum((-2, -1)) / positive.clamp(min=1), torch.full_like(positive, lam))
    deg = a.sum(-1)
    diag = torch.where(valid, deg + zc[..., None], torch.ones_like(deg))
    if grad:
        k = torch.diag_embed(diag) - a
    else:
        k = a.neg_()
        k.diagonal(dim1=-2, dim2=-1).add_(diag)
    d = inverse_diagonal(k)  # (K^-1)_ll
    # Off-diagonal column sums of K^-1: K 1 = Z 1 on the valid block, so K^-1 1 = 1 / Z there, and the sum is
    # 1/Z - (K^-1)_ll (no solve; for a connected node (K^-1)_ll <= (1/Z) (s + Z) / (2s + Z) with s >= its
    # strongest affinity, so the difference keeps its precision unless Z is far above the affinities).
    off = 1 / zc[..., None] - d
    connected = valid & (deg > 0)
    # weight = 1 / potential = diag * (n + 1) / off; an isolated node (off = 0) would get +inf (NaN descriptor in
    # the authors' code): it gets the largest weight of its image's connected nodes, or 1 when none is connected.
    w = torch.where(connected, d * (n_valid + 1) / torch.where(connected, off, torch.ones_like(off)), 0.0)
    top = w.amax(-1, keepdim=True)
    fill = torch.where(connected.any(-1, keepdim=True), top, torch.ones_like(top))
    return torch.where(connected, w, torch.where(valid, fill.expand_as(w), torch.zeros_like(w)))


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number below ``value`` (as that dtype rounds it); plain NumPy, no tensor op."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32  # the compute dtype is float32 or float64
    return float(np.nextafter(np_dtype(value), np_dtype(-np.inf)))


def _hew_checks(
    x: torch.Tensor,
    *,
    lam: float,
    mask: torch.Tensor | None,
    variant: str,
    center: torch.Tensor | None,
    affinity_threshold: float | None,
    method: str,
    fn: str,
) -> tuple[float, float]:
    """The argument checks of :func:`hew_weights`, with errors naming ``fn``; returns ``lam`` and the threshold."""
    _check_maps(x, mask, fn)
    lam = _check_positive(lam, "lam", fn)
    _check_variant(variant, fn)
    if method not in METHODS:
        raise ValueError(f"{fn}(): method must be one of {METHODS}; got {method!r}.")
    if variant == "paper":
        for name, value in (("center", center), ("affinity_threshold", affinity_threshold)):
            if value is not None:
                raise ValueError(f"{fn}(): {name} is a keyword of variant='hewr' only; got {name}={value!r}.")
    elif method == "woodbury":
        raise ValueError(
            f"{fn}(): method='woodbury' is exact only for variant='paper' (the hewr threshold breaks the "
            f"low-rank structure); use method='cholesky' or 'auto'."
        )
    if center is not None:
        check_shape(center, "C", name="center", fn=fn, sizes={"C": x.shape[1]}, hint="The mean local feature.")
        check_floating(center, name="center", fn=fn)
        check_same_device({"x": x, "center": center}, fn=fn)
    return lam, HEWR_THRESHOLD if affinity_threshold is None else float(affinity_threshold)


def _weights_block(
    x: torch.Tensor, mask: torch.Tensor | None, *, fast: bool = False, buf: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor:
    """The HeW weights :math:`(B, H, W)` of checked arguments (``kwargs`` of :func:`_weights_of`), in ``x``'s dtype."""
    return _weights_of(_zeroed_maps(x, mask, kwargs["center"], fast), mask, **kwargs).to(x.dtype)


def _zeroed_maps(x: torch.Tensor, mask: torch.Tensor | None, center: torch.Tensor | None, fast: bool) -> torch.Tensor:
    """``x`` in the compute dtype with its padding zeroed: garbage (inf, nan) there must not reach a product."""
    xf = x.to(_compute_dtype(x) if center is None else _compute_dtype(x, center))
    return xf if mask is None else fill_padding(xf, mask, 0.0, fast=fast)


def _weights_of(
    xf: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    lam: float,
    variant: str,
    center: torch.Tensor | None,
    threshold: float,
    method: str,
) -> torch.Tensor:
    """The HeW weights :math:`(B, H, W)` of zeroed maps ``xf`` (:func:`_zeroed_maps`), in their dtype."""
    b, _, h, w = xf.shape
    f = xf.flatten(2)  # (B, C, n): reductions over C stay in the maps' contiguous layout
    valid = torch.ones(b, h * w, dtype=torch.bool, device=xf.device) if mask is None else mask.flatten(1)
    if variant == "paper":
        weights = _paper_weights(f, valid, lam, method)
    else:
        weights = _hewr_weights(f, valid, lam, center, threshold)
    return weights.reshape(b, h, w)


def _hew_weights(
    x: torch.Tensor,
    *,
    lam: float,
    mask: torch.Tensor | None,
    variant: str,
    center: torch.Tensor | None,
    affinity_threshold: float | None,
    method: str,
    fn: str,
) -> torch.Tensor:
    """:func:`hew_weights`, with errors naming ``fn`` (the function the user called)."""
    lam, threshold = _hew_checks(
        x,
        lam=lam,
        mask=mask,
        variant=variant,
        center=center,
        affinity_threshold=affinity_threshold,
        method=method,
        fn=fn,
    )
    # Over blocks of images on CPU: measured 10-15% faster than the whole batch at 32 x 512 x 24 x 32 (its
    # map-sized products and buffers stay in cache), the same at 8 x 512 x 48 x 64 (one image is already 6 MB).
    return blocked(
        _weights_block,
        x,
        mask,
        itemsize=torch.finfo(_compute_dtype(x)).bits // 8,
        block_bytes=_block_bytes(x, variant, method),
        fast_args=True,
        lam=lam,
        variant=variant,
        center=center,
        threshold=threshold,
        method=method,
    )


def _hew_block(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    fast: bool,
    buf: torch.Tensor | None,
    **kwargs: Any,
) -> torch.Tensor:
    """HeW's weighted sums :math:`(B, C)` in the compute dtype, before the clamp and the power."""
    xf = _zeroed_maps(x, mask, kwargs["center"], fast)
    return weighted_sums(xf, _weights_of(xf, mask, **kwargs), fast=fast)


def hew_weights(
    x: torch.Tensor,
    *,
    lam: float,
    mask: torch.Tensor | None = None,
    variant: str = "paper",
    center: torch.Tensor | None = None,
    affinity_threshold: float | None = None,
    method: str = "auto",
) -> torch.Tensor:
    r"""Heat-diffusion weights of the local features of each feature map (HeW, eqs. 3-7 and 13).

    ``variant="paper"`` (design.md 3.2): among the valid, non-zero local features :math:`f_l` (l = h*W + w),
    :math:`P(m,n) = \cos(f_m, f_n)` off the diagonal, :math:`P(m,m) = 0`, :math:`a_m = \sum_n P(m,n) + \lambda`,
    :math:`M = I - \mathrm{diag}(a)^{-1}P`, :math:`\psi_l = \sum_m M^{-1}(m,l) / M^{-1}(l,l)` (eq. 13, self term
    included) and :math:`w_l = 1/\psi_l`, computed as :math:`\lambda (K^{-1})_{ll}` (module docstring). Zero
    feature vectors and masked positions get weight 0 and take no part. The paper assumes non-negative
    (post-ReLU) features; with negative cosines K may be indefinite, and an image whose K is not positive
    definite gets NaN weights (reported per image, never raised).

    ``variant="hewr"`` reproduces the authors' released MATLAB: features centred by ``center`` (a :math:`(C,)`
    mean local feature of a training set; None = no centring) and L2-normalised, affinities below
    ``affinity_threshold`` (default 0.1) set to 0 (negatives too), the diagonal and the block between positions
    whose *uncentred* channel sum is 0 zeroed, ground conductance ``lam * mean(positive affinities)`` (so
    ``lam = 0.1`` is their ``constZ``), potential = (off-diagonal column sum of the inverse) / (diagonal) /
    (n + 1), weight = 1 / potential; zero features stay in the graph (after centring they are not zero).
    n counts the image's valid positions. **Isolated positions**: a position whose affinities all fall under the
    threshold has potential 0, i.e. an infinite weight and a NaN descriptor in the authors' code; here it gets
    the largest weight of its image's connected positions (the most distinctive weight that is finite), and
    when no position of an image is connected every valid position gets weight 1 (plain sum pooling).

    Paths (``method``): ``"cholesky"`` factorises the n x n system; ``"woodbury"`` (``variant="paper"`` only)
    factorises a C x C one, :math:`O(nC^2)`; ``"auto"`` picks the faster by shape for ``"paper"`` (without
    autograd Woodbury from n = C on, as measured; with autograd by flop count) and the Cholesky path for
    ``"hewr"`` (the only exact one once the threshold has broken the low-rank structure).
    Every path is exact (float64: equal to the dense inverse to ~1e-12) and differentiable with respect to
    ``x`` (and ``center``); the hewr threshold and the isolated-node rule are piecewise. Batched over images;
    a padded batch with ``mask`` equals its images alone. Computed in at least float32; returned in the dtype
    of ``x``. No host sync: compiles with ``fullgraph=True``.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`, non-negative for ``"paper"`` (e.g. post-ReLU).
        lam: Ground conductance, > 0: the additive constant of :math:`a_m` (``"paper"``), or the factor of the
            mean positive affinity (``"hewr"``, the authors use 0.1).
        mask: Optional bool validity mask :math:`(B, H, W)`; masked positions get weight 0.
        variant: ``"paper"`` or ``"hewr"``.
        center: ``"hewr"`` only: the :math:`(C,)` mean local feature subtracted before the affinities.
        affinity_threshold: ``"hewr"`` only: affinities below it are zeroed (None: 0.1).
        method: ``"auto"``, ``"cholesky"`` or ``"woodbury"``.

    Returns:
        Weights of shape :math:`(B, H, W)`.

    Raises:
        ShapeError: If ``x`` is not 4-D, ``mask`` does not match it, or ``center`` is not :math:`(C,)`.
        DTypeError: If ``x`` or ``center`` is not floating point, or ``mask`` is not bool.
        ValueError: If ``lam <= 0``, ``variant`` or ``method`` is unknown, ``"woodbury"`` is asked for
            ``"hewr"``, or ``center``/``affinity_threshold`` is given with ``variant="paper"``.
        RuntimeError: If an image's mask is empty.

    Example:
        >>> hew_weights(torch.rand(2, 512, 24, 32), lam=1.0).shape
        torch.Size([2, 24, 32])
    """
    return _hew_weights(
        x,
        lam=lam,
        mask=mask,
        variant=variant,
        center=center,
        affinity_threshold=affinity_threshold,
        method=method,
        fn="hew_weights",
    )


def hew(
    x: torch.Tensor,
    *,
    lam: float,
    alpha: float = 0.5,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    variant: str = "paper",
    center: torch.Tensor | None = None,
    affinity_threshold: float | None = None,
    method: str = "auto",
) -> torch.Tensor:
    r"""HeW aggregation (eq. 8 without its normalisation): :math:`\max(\sum_l w_l f_l, \epsilon)^\alpha`.

    The weights are :func:`hew_weights` (same keywords); they multiply the original, *uncentred* features
    (also in ``"hewr"``, as the authors do). The power is elementwise on the sum clamped at ``eps`` (finite
    gradient at 0); :class:`deepagg.nn.HeWPool` L2-normalises the result. Computed in at least float32;
    returned in the dtype of ``x``; differentiable with respect to ``x``.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`.
        lam: Ground conductance, > 0 (see :func:`hew_weights`).
        alpha: The power, > 0 (0.5 in the paper).
        eps: Clamp floor of the weighted sum before the power, > 0.
        mask: Optional bool validity mask :math:`(B, H, W)`.
        variant: ``"paper"`` or ``"hewr"``.
        center: ``"hewr"`` only: the :math:`(C,)` centre.
        affinity_threshold: ``"hewr"`` only (None: 0.1).
        method: ``"auto"``, ``"cholesky"`` or ``"woodbury"``.

    Returns:
        Raw HeW vectors of shape :math:`(B, C)`.

    Raises:
        ValueError: If ``alpha`` or ``eps`` is not positive, and as :func:`hew_weights`.

    Example:
        >>> hew(torch.rand(2, 512, 24, 32), lam=1.0).shape
        torch.Size([2, 512])
    """
    fn = "hew"
    alpha, eps = _check_positive(alpha, "alpha", fn), _check_positive(eps, "eps", fn)
    lam, threshold = _hew_checks(
        x,
        lam=lam,
        mask=mask,
        variant=variant,
        center=center,
        affinity_threshold=affinity_threshold,
        method=method,
        fn=fn,
    )
    # On CPU over blocks of images, a padded batch image by image on its valid rectangle (crop=True: the
    # weights of the padding are 0 anyway, and the n x n / C x n systems shrink to the valid positions).
    pooled = blocked(
        _hew_block,
        x,
        mask,
        itemsize=torch.finfo(_compute_dtype(x)).bits // 8,
        block_bytes=_block_bytes(x, variant, method),
        crop=True,
        fast_args=True,
        lam=lam,
        variant=variant,
        center=center,
        threshold=threshold,
        method=method,
    )
    return pooled.clamp(min=eps).pow(alpha).to(x.dtype)


class _HeRWork:
    """Work buffers of :func:`heat_rerank`, made once per call and reused by every chunk of queries.

    ``x`` :math:`(Q, k+1, D)`: the shortlist vectors and the query. ``s`` :math:`(Q, k+1, k+1)`: the system
    matrix; its strictly upper blocks (of :func:`block_edges`) are never written and stay 0. ``mean``: a row of
    ``1 / (k+1)`` (the set's mean as one matrix product). :meth:`views` gives the block views of the first m
    queries (made once per m: on 2 CPU cores the slicing of every block for every query was a tenth of the time).
    """

    def __init__(self, step: int, k: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        n = k + 1
        self.edges = block_edges(n, GRAM_BLOCKS)
        width = max(b - a for a, b in itertools.pairwise(self.edges))
        self.x = torch.empty(step, n, d, dtype=dtype, device=device)
        self.s = torch.zeros(step, n, n, dtype=dtype, device=device)
        self.strict = torch.ones(width, width, dtype=dtype, device=device).tril_(-1)
        self.mean = torch.full((1, 1, n), 1.0 / n, dtype=dtype, device=device)
        self._views: dict[int, tuple] = {}

    def views(self, m: int) -> tuple:
        """``x``, ``s``, the Gram blocks ``(out, left, right)``, the diagonal blocks with their strict masks."""
        if m not in self._views:
            x, s = self.x[:m], self.s[:m]
            pairs = list(itertools.pairwise(self.edges))
            gram = [(s[:, a:b, :b], x[:, a:b], x[:, :b].mT) for a, b in pairs]
            diag = [(s[:, a:b, a:b], self.strict[: b - a, : b - a]) for a, b in pairs]
            self._views[m] = (x, s, gram, diag, s.diagonal(dim1=-2, dim2=-1))
        return self._views[m]


@torch.no_grad()
def _her_rewards(q: torch.Tensor, work: _HeRWork, m: int, *, lam: float, variant: str) -> torch.Tensor:
    r"""HeR rewards :math:`\mu` :math:`(m, k)` of ``m`` queries; no autograd. See :func:`heat_rerank`.

    The first k rows of ``work.x[:m]`` hold each query's shortlist vectors; the query goes last (the authors'
    node order). Only the lower block triangle of the Gram matrix is computed (5/8 of the work), negated, so
    that ``work.s`` becomes the grounded Laplacian K of all k + 1 nodes in place (lower triangle). Its Cholesky
    factor L holds the first half of the solve for free: the query's row of L is :math:`-L_{dd}^{-1} A_{dq}`,
    so :math:`\mu = K_{dd}^{-1} A_{dq}` is one triangular solve with L itself.
    """
    x, s, gram, diag_blocks, diagonal = work.views(m)
    x[:, -1] = q
    x -= work.mean @ x
    if variant == "paper":
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        x /= norm.masked_fill_(norm == 0, 1.0)  # a zero centred vector stays zero
    compiling = torch.compiler.is_compiling()
    for out, left, right in gram:
        if compiling:  # Dynamo refuses a non-contiguous out=
            out.copy_(-(left @ right))
        else:
            torch.baddbmm(out, left, right, beta=0, alpha=-1, out=out)
    s.clamp_(max=0)  # -max(affinity, 0)
    for block, strict in diag_blocks:
        block.mul_(strict)  # strictly lower: the diagonal and its mirror dropped
    minus_degree = s.sum(-1).add_(s.sum(-2))  # minus the full symmetric row sums
    if variant == "paper":
        diagonal.copy_(minus_degree.neg_().add_(lam))
    else:
        positive = -torch.sign(s).sum((-2, -1))[:, None]  # s <= 0: count_nonzero was 4x slower on CPU (ad hoc)
        mean = -s.sum((-2, -1))[:, None] / positive.clamp(min=1)  # the same over one triangle as over both
        diagonal.copy_(torch.where(positive > 0, lam * mean, lam) - minus_degree)
    factor, info = torch.linalg.cholesky_ex(s)
    # L^T z = (-l_q, 0) with l_q the query's row of L gives z = (mu, 0); as z^T L = (-l_q, 0)^T, no transpose.
    rhs = factor[:, -1:, :].neg()
    rhs[..., -1] = 0
    mu = torch.linalg.solve_triangular(factor, rhs, upper=False, left=False)[:, 0, :-1]
    return mu.masked_fill_((info != 0)[:, None], 0.0)  # not PD: every reward ties


def heat_rerank(
    q: torch.Tensor,
    db: torch.Tensor,
    ranks: torch.Tensor,
    *,
    k: int = 800,
    lam: float,
    variant: str = "paper",
    chunk: int | None = None,
) -> torch.Tensor:
    r"""Heat re-ranking (HeR, sec. IV, eq. 14): re-sort each query's top k by the temperature the query induces.

    ``variant="paper"`` (design.md 3.2): the set {query, top k} is centred (minus its mean) and re-normalised;
    :math:`S` = cosine similarities with negatives clipped to 0 and zero diagonal; for the k database nodes
    :math:`a_m = \sum_{n} S(m, n) + \lambda` over all k + 1 nodes and
    :math:`\mu = (I - \Lambda^{-1} Q_2)^{-1} \Lambda^{-1} Q_1` (:math:`Q_2` among the k, :math:`Q_1` to the query).
    ``variant="hewr"`` is the authors' ``cast_rerank.m``: the centred vectors are *not* re-normalised (dot
    products), negatives clipped, zero diagonal, ground conductance ``lam * mean(positive affinities)`` over all
    k + 1 nodes (``lam = 0.1`` is their ``constZ``), reward = the query's column of the inverse of the grounded,
    row-normalised Laplacian restricted to the k images (a positive multiple of :math:`\mu` above, so the same
    order). The top k are re-sorted by decreasing reward, ties kept in their old order; the rest of each ranking
    is unchanged. ``k`` is capped at the ranking length. Per query one (k+1) x (k+1) Cholesky factorisation
    and one triangular solve (batched; the queries are processed ``chunk`` at a time: None = all at once on CUDA,
    one at a time on CPU, which measured faster on 2 cores, ``benchmarks/bench_heat.py``). A query whose system
    is not positive definite (impossible for finite inputs) keeps its order. The selection is not
    differentiable (rankings are returned).

    Args:
        q: L2-normalised query descriptors :math:`(Q, D)`.
        db: L2-normalised database descriptors :math:`(N, D)`.
        ranks: Initial rankings :math:`(Q, K)` int64 of database indices, best first (e.g. ``argsort`` of
            ``q @ db.T``, descending).
        k: Shortlist length, an int >= 1 (800 in the paper), capped at ``K``.
        lam: Ground conductance, > 0.
        variant: ``"paper"`` or ``"hewr"``.
        chunk: Queries per batched solve (None: by device, see above).

    Returns:
        New rankings :math:`(Q, K)` int64.

    Raises:
        ShapeError: If ``q``/``db`` are not 2-D with the same D, or ``ranks`` is not :math:`(Q, K)`.
        DTypeError: If ``q``/``db`` are not floating point or ``ranks`` is not int64.
        ValueError: If ``k < 1``, ``lam <= 0`` or ``variant`` is unknown.

    Example:
        >>> from deepagg.functional import l2n
        >>> q, db = l2n(torch.randn(3, 16)), l2n(torch.randn(50, 16))
        >>> ranks = torch.argsort(q @ db.T, dim=1, descending=True)
        >>> heat_rerank(q, db, ranks, k=20, lam=1.0).shape
        torch.Size([3, 50])
    """
    fn = "heat_rerank"
    bound = check_shape(q, "Q,D", name="q", fn=fn, hint="Pass descriptors as rows.")
    check_shape(db, "N,D", name="db", fn=fn, sizes={"D": bound["D"]}, hint="q and db must have the same D.")
    check_shape(ranks, "Q,K", name="ranks", fn=fn, sizes={"Q": bound["Q"]}, hint="One ranking per query.")
    check_floating(q, name="q", fn=fn)
    check_floating(db, name="db", fn=fn)
    check_dtype(ranks, (torch.int64,), name="ranks", fn=fn)
    check_same_device({"q": q, "db": db, "ranks": ranks}, fn=fn)
    k = min(check_int(k, name="k", fn=fn, minimum=1), ranks.shape[1])
    lam = _check_positive(lam, "lam", fn)
    _check_variant(variant, fn)
    if chunk is not None:
        chunk = check_int(chunk, name="chunk", fn=fn, minimum=1)
    if k <= 1 or q.shape[0] == 0:
        return ranks.clone()
    dtype = _compute_dtype(q, db)
    step = chunk if chunk is not None else (q.shape[0] if q.device.type == "cuda" else 1)
    step = min(step, q.shape[0])
    head = ranks[:, :k]
    qc, dbc = q.to(dtype), db.to(dtype)  # once, not per chunk
    work = _HeRWork(step, k, q.shape[1], dtype, q.device)
    out = []
    with torch.no_grad():
        for start in range(0, q.shape[0], step):
            top = head[start : start + step]
            m = top.shape[0]
            rows = work.x[:m, :k]
            if rows.is_contiguous():  # one query: gather straight into the buffer
                torch.index_select(dbc, 0, top.reshape(-1), out=rows.view(m * k, -1))
            else:
                rows.copy_(dbc[top])
            mu = _her_rewards(qc[start : start + step], work, m, lam=lam, variant=variant)
            mu = torch.nan_to_num(mu, nan=0.0)  # a failed factorisation keeps the old order (all ties)
            order = torch.argsort(mu, dim=1, descending=True, stable=True)
            out.append(top.gather(1, order))
    return torch.cat([torch.cat(out), ranks[:, k:]], dim=1)
