r"""Descriptor whitening: PCA-whitening with shrinkage, learned (supervised) whitening Lw, and its application.

Fitting (:func:`pca_whitening`, :func:`learned_whitening`) returns a pair ``(mean, projection)`` with ``mean`` of
shape :math:`(D,)` and ``projection`` of shape :math:`(d, D)`; :func:`whiten` applies it to descriptor rows as
:math:`(x - \mu) P^\top`, the same as an ``nn.Linear`` with ``weight = P`` and ``bias = -P \mu``.

Numerics of the fits (design.md 3.2, anchors.md 6.6):

- Everything is computed in float64 and cast back to the dtype of ``x`` at the end.
- Symmetric matrices are decomposed with :func:`torch.linalg.eigh` (never ``eig``, never an LU-based
  ``solve``/``inv``, which is broken for batched inputs after ``torch.set_num_threads``; environment.md).
- Rank rule: the numerical rank r of the decomposed :math:`D \times D` matrix (the covariance for PCA, the
  pair-difference covariance :math:`C_S` for Lw) is the number of eigenvalues above
  :math:`\lambda_1 \cdot D \cdot \varepsilon_{64}` (:math:`\varepsilon_{64}` = ``torch.finfo(torch.float64).eps``), the
  default tolerance of ``numpy.linalg.matrix_rank`` for that matrix. ``eigh`` is backward stable, so eigenvalues
  below it (an exact zero comes out at about :math:`\lambda_1 \varepsilon_{64}`) are indistinguishable from rounding.
  The eigenvectors of the remaining D - r eigenvalues are not determined by the data (any basis of the null space
  would do), so a fit keeps at most r output directions, all inside the supported subspace, and warns
  (``UserWarning``) when more were requested. Typical causes: N - 1 < D rows for PCA, fewer than D linearly
  independent matching-pair differences for Lw.
- Inside the supported subspace, eigenvalues are floored at ``eig_floor`` times the largest one before any negative
  power, so small but non-zero directions are scaled by a bounded factor instead of exploding.
- The sign of every eigenvector is fixed so that its largest-magnitude component (the first such, on ties) is
  positive; a fit on the same data therefore always gives the same projection.
- Covariances use the unbiased normalisation :math:`1/(N-1)` (as ``numpy.cov`` and scikit-learn's PCA), so
  PCA-whitened training data has exactly the identity as its sample covariance (``shrinkage=1``).

Fitting is exempt from ``torch.compile`` (it reads values to the host to validate them); :func:`whiten` is a
plain dense tensor function and compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import math
import warnings

import torch

from deepagg._checks import ShapeError, check_dtype, check_floating, check_same_device, check_shape

__all__ = ["learned_whitening", "pca_whitening", "whiten"]

_INDEX_DTYPES = (torch.int64, torch.int32)
_CENTERS = ("all", "queries")


def _check_training_set(x: torch.Tensor, fn: str, in_dim: int | None, name: str) -> tuple[int, int]:
    sizes = {"D": in_dim} if in_dim is not None else None
    bound = check_shape(x, "N,D", name=name, fn=fn, sizes=sizes, hint="Pass descriptors as rows.")
    check_floating(x, name=name, fn=fn)
    n, d = bound["N"], bound["D"]
    if n < 2:
        raise ShapeError(
            f"{fn}(): {name} must have at least 2 rows (N >= 2) to estimate a covariance; got shape {tuple(x.shape)}.",
            expected="N >= 2",
            actual=tuple(x.shape),
        )
    if d < 1:
        raise ShapeError(
            f"{fn}(): {name} must have at least 1 column (D >= 1); got shape {tuple(x.shape)}.",
            expected="D >= 1",
            actual=tuple(x.shape),
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}(): {name} must be finite; got NaN or infinite entries.")
    return n, d


def _check_dim(dim: int | None, d: int, fn: str) -> int:
    if dim is None:
        return d
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}(): dim must be an int or None; got {type(dim).__name__}.")
    if not 1 <= dim <= d:
        raise ValueError(f"{fn}(): dim must satisfy 1 <= dim <= D = {d}; got {dim}.")
    return dim


def _check_eig_floor(eig_floor: float, fn: str) -> None:
    if not (isinstance(eig_floor, (int, float)) and 0.0 < float(eig_floor) < 1.0):
        raise ValueError(f"{fn}(): eig_floor must be in (0, 1) (relative to the largest eigenvalue); got {eig_floor}.")


def _sorted_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric float64 matrix, eigenvalues descending, signs fixed.

    Returns ``(eigenvalues (D,), eigenvectors (D, D) as columns)``. The sign of each column is chosen so that its
    largest-magnitude entry (the first one on ties) is positive.
    """
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.flip(0)
    evecs = evecs.flip(1)
    pivot = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs.gather(0, pivot[None]))
    return evals, evecs * signs


def _floored(evals: torch.Tensor, eig_floor: float, fn: str, what: str) -> torch.Tensor:
    top = float(evals.max())
    if top <= 0.0:
        raise ValueError(
            f"{fn}(): the {what} is zero (largest eigenvalue {top:.3g}); the training descriptors must not all be "
            "equal."
        )
    return evals.clamp(min=eig_floor * top)


def _numerical_rank(evals: torch.Tensor) -> int:
    """Number of eigenvalues above ``lambda_max * D * eps`` (``numpy.linalg.matrix_rank``'s rule for a D x D matrix)."""
    tol = float(evals.max()) * evals.shape[0] * torch.finfo(torch.float64).eps
    return int((evals > tol).sum())


def _check_lw_shrinkage(shrinkage: float, fn: str) -> float:
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(
            f"{fn}(): shrinkage must be a number in [0, 1] (0: Lw as published, 1: the pair covariance is ignored); "
            f"got {shrinkage!r}."
        )
    return float(shrinkage)


def _check_center(center: str, fn: str) -> None:
    if not (isinstance(center, str) and center in _CENTERS):
        raise ValueError(f"{fn}(): center must be 'all' or 'queries'; got {center!r}.")


def _warn_rank(fn: str, source: str, what: str, requested: int, rank: int, remedy: str, advice: str) -> None:
    # stacklevel 4: _warn_rank <- _*_whitening64 <- the public function or Whiten.fit_* <- the caller.
    warnings.warn(
        f"{fn}(): {source} only {rank} of the {requested} requested dimensions ({what}); the projection keeps "
        f"{rank}. {remedy} or {advice}.",
        UserWarning,
        stacklevel=4,
    )


def _covariance(xc: torch.Tensor) -> torch.Tensor:
    return xc.T @ xc / (xc.shape[0] - 1)


def _pca_whitening64(
    x: torch.Tensor,
    dim: int | None,
    shrinkage: float,
    eig_floor: float,
    fn: str,
    in_dim: int | None = None,
    name: str = "x",
    advice: str = "pass dim <= {rank}",
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = _check_training_set(x, fn, in_dim, name)
    dim = _check_dim(dim, d, fn)
    if not (isinstance(shrinkage, (int, float)) and math.isfinite(shrinkage) and shrinkage >= 0):
        raise ValueError(f"{fn}(): shrinkage must be a finite number >= 0 (1 = full whitening); got {shrinkage}.")
    _check_eig_floor(eig_floor, fn)
    x64 = x.detach().to(torch.float64)
    mean = x64.mean(dim=0)
    evals, evecs = _sorted_eigh(_covariance(x64 - mean))
    scale = _floored(evals, eig_floor, fn, "covariance of x").pow(-0.5 * shrinkage)
    # Only the r supported eigenvectors are determined by the data (r <= N - 1): keep at most r of them.
    rank = _numerical_rank(evals)
    if dim > rank:
        _warn_rank(
            fn,
            f"the {n} training rows determine",
            f"rank of the covariance, at most N - 1 = {n - 1}",
            dim,
            rank,
            f"Add training rows (at least D + 1 = {d + 1} in general position)",
            advice.format(rank=rank),
        )
        dim = rank
    projection = scale[:dim, None] * evecs[:, :dim].T
    return mean, projection


def _learned_whitening64(
    x: torch.Tensor,
    pos_pairs: torch.Tensor,
    dim: int | None,
    eig_floor: float,
    fn: str,
    in_dim: int | None = None,
    name: str = "x",
    center: str = "all",
    advice: str = "pass dim <= {rank}",
    shrinkage: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = _check_training_set(x, fn, in_dim, name)
    dim = _check_dim(dim, d, fn)
    _check_eig_floor(eig_floor, fn)
    _check_center(center, fn)
    shrinkage = _check_lw_shrinkage(shrinkage, fn)
    check_shape(pos_pairs, "P,2", name="pos_pairs", fn=fn, hint="Pass (P, 2) row indices of matching pairs.")
    check_dtype(pos_pairs, _INDEX_DTYPES, name="pos_pairs", fn=fn)
    check_same_device({name: x, "pos_pairs": pos_pairs}, fn=fn)
    if pos_pairs.shape[0] < 1:
        raise ShapeError(
            f"{fn}(): pos_pairs must hold at least one pair (P >= 1); got shape {tuple(pos_pairs.shape)}.",
            expected="P >= 1",
            actual=tuple(pos_pairs.shape),
        )
    lo, hi = int(pos_pairs.min()), int(pos_pairs.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{fn}(): pos_pairs must index rows of {name} in [0, {n - 1}]; got values in [{lo}, {hi}].")
    x64 = x.detach().to(torch.float64)
    pairs = pos_pairs.to(torch.int64)
    diff = x64[pairs[:, 0]] - x64[pairs[:, 1]]
    # Intra-class covariance of matching-pair differences, and its symmetric inverse square root restricted to the
    # r supported eigenpairs (the span of the differences): P1 = U_r diag(lambda_r^-1/2) U_r^T, zero on the rest.
    cov_s = diff.T @ diff / diff.shape[0]
    evals_s, evecs_s = _sorted_eigh(cov_s)
    if shrinkage > 0.0:
        # Shrink towards the isotropic covariance of the same trace: (1 - a) C_S + a tr(C_S)/D I. Same
        # eigenvectors; every eigenvalue is at least a times the mean one, so C_S is full rank.
        evals_s = (1.0 - shrinkage) * evals_s + shrinkage * evals_s.clamp(min=0).mean()
    inv_sqrt = _floored(evals_s, eig_floor, fn, "covariance of the pair differences").rsqrt()
    rank = _numerical_rank(evals_s)
    if dim > rank:
        p = pairs.shape[0]
        _warn_rank(
            fn,
            f"the {p} matching pair{'s' if p != 1 else ''} determine{'' if p != 1 else 's'}",
            "rank of the pair-difference covariance",
            dim,
            rank,
            f"Add matching pairs (at least {d} linearly independent differences)",
            advice.format(rank=rank),
        )
        dim = rank
    u = evecs_s[:, :rank]
    p1 = (u * inv_sqrt[:rank]) @ u.T
    # Rotation onto the principal directions of the P1-whitened training data (no second scaling). Its covariance
    # has rank r, and P1 maps every direction onto the supported subspace, so the dim <= r leading rows lie in it.
    mean = x64.mean(dim=0) if center == "all" else x64[pairs[:, 0]].mean(dim=0)
    _, evecs = _sorted_eigh(_covariance((x64 - mean) @ p1))
    projection = evecs[:, :dim].T @ p1
    return mean, projection


def pca_whitening(
    x: torch.Tensor,
    *,
    dim: int | None = None,
    shrinkage: float = 1.0,
    eig_floor: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fit PCA-whitening with shrinkage on descriptor rows.

    Unsupervised PCA-whitening (Jégou and Chum, ECCV 2012; shrinkage as in HOW, Tolias et al., ECCV 2020). With
    :math:`\mu` the mean of the rows, :math:`C = \frac{1}{N-1}\sum_i (x_i - \mu)(x_i - \mu)^\top = V \Lambda V^\top`
    (eigenvalues descending), and :math:`\tilde\lambda_j = \max(\lambda_j, \text{eig\_floor}\cdot\lambda_1)`,
    the projection is :math:`P = \mathrm{diag}(\tilde\lambda_{1..d}^{-s/2}) V_{:, 1..d}^\top`. ``shrinkage`` s = 1
    is full whitening (the whitened training rows have identity covariance), s = 0 is the PCA rotation only, and
    values in between shrink the large eigenvalues less. Eigenvector signs are fixed (largest-magnitude component
    positive). Computed in float64; returned in the dtype of ``x``. Not compiled (fitting).

    Rank cap: only the eigenvectors of the r eigenvalues above :math:`\lambda_1 \cdot D \cdot \varepsilon_{64}`
    (``numpy.linalg.matrix_rank``'s rule; r <= N - 1 because the rows are centred) are determined by the data, so
    the output dimension is :math:`d = \min(\text{dim or } D, r)`, and a ``UserWarning`` says so when the requested
    dimension exceeds r, e.g. ``pca_whitening(): the 5 training rows determine only 4 of the 16 requested
    dimensions (rank of the covariance, at most N - 1 = 4); the projection keeps 4. Add training rows (at least
    D + 1 = 17 in general position) or pass dim <= 4.`` With r = D the result is unchanged by the cap.

    Args:
        x: Training descriptors of shape :math:`(N, D)`, N >= 2 (use a set disjoint from the test set). With
            N - 1 < D the covariance has rank at most N - 1, and the output keeps at most that many directions.
        dim: Requested output dimension, ``1 <= dim <= D``; ``None`` requests all D. The output has
            :math:`d = \min(\text{dim}, r)` rows.
        shrinkage: The exponent s >= 0 of the eigenvalue scaling :math:`\lambda^{-s/2}`.
        eig_floor: Eigenvalues of the supported subspace are floored at ``eig_floor`` times the largest, in (0, 1).

    Returns:
        ``(mean, projection)`` of shapes :math:`(D,)` and :math:`(d, D)`, :math:`d = \min(\text{dim or } D, r)`,
        for :func:`whiten`.

    Warns:
        UserWarning: Once, if the requested dimension exceeds the rank r of the covariance (the output keeps r).

    Raises:
        ShapeError: If ``x`` is not 2-D, or has fewer than 2 rows or no column.
        DTypeError: If ``x`` is not floating point.
        TypeError: If ``dim`` is not an int.
        ValueError: If ``dim``, ``shrinkage`` or ``eig_floor`` is out of range, ``x`` is not finite, or its
            covariance is zero.

    Example:
        >>> mean, proj = pca_whitening(torch.randn(100, 16), dim=8)
        >>> mean.shape, proj.shape
        (torch.Size([16]), torch.Size([8, 16]))
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     mean, proj = pca_whitening(torch.randn(5, 16))  # rank 4 = N - 1
        >>> proj.shape, len(caught)
        (torch.Size([4, 16]), 1)
    """
    mean, projection = _pca_whitening64(x, dim, shrinkage, eig_floor, "pca_whitening")
    return mean.to(x.dtype), projection.to(x.dtype)


def learned_whitening(
    x: torch.Tensor,
    pos_pairs: torch.Tensor,
    *,
    dim: int | None = None,
    eig_floor: float = 1e-10,
    center: str = "all",
    shrinkage: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fit the supervised learned whitening Lw from matching pairs.

    Mikolajczyk and Matas, ICCV 2007, as used by Radenović, Tolias and Chum (TPAMI 2018). With the intra-class
    covariance of the matching-pair differences :math:`C_S = \frac{1}{P}\sum_{(i,j)} (x_i - x_j)(x_i - x_j)^\top`
    (no centring), of numerical rank r, with eigenpairs :math:`(\lambda_j, u_j)` (descending, signs fixed), its
    symmetric inverse square root on the supported subspace is
    :math:`P_1 = \sum_{j \le r} \tilde\lambda_j^{-1/2} u_j u_j^\top` (by ``eigh``; :math:`\tilde\lambda_j` floored at
    ``eig_floor`` times :math:`\lambda_1`), which is :math:`C_S^{-1/2}` when r = D. The training rows are centred by
    :math:`\mu`, whitened by :math:`P_1`, and rotated onto the eigenvectors :math:`V` (descending, signs fixed) of
    their second moment about :math:`\mu` (the covariance for ``center="all"``): :math:`P = V_{:, 1..d}^\top P_1`.
    The second step is a rotation only, so the pair differences have identity covariance on the kept directions,
    :math:`P C_S P^\top = I_d` (when no eigenvalue is floored). Computed in float64; returned in the dtype of
    ``x``. Not compiled (fitting).

    Rank cap: r is the number of eigenvalues of :math:`C_S` above :math:`\lambda_1 \cdot D \cdot \varepsilon_{64}`
    (``numpy.linalg.matrix_rank``'s rule), at most P and at most N minus the number of connected components of the
    pair graph. The other D - r directions carry no matching-pair difference, so :math:`C_S^{-1/2}` is undefined
    there (a floor would amplify them by about :math:`\text{eig\_floor}^{-1/2}`, and the rotation would then keep
    mostly those noise directions). The projection is therefore restricted to the span of the differences, the
    output dimension is :math:`d = \min(\text{dim or } D, r)`, and a ``UserWarning`` says so when the requested
    dimension exceeds r, e.g. ``learned_whitening(): the 130 matching pairs determine only 130 of the 512 requested
    dimensions (rank of the pair-difference covariance); the projection keeps 130. Add matching pairs (at least 512
    linearly independent differences) or pass dim <= 130.`` With r = D the result is unchanged by the cap.

    Shrinkage: with ``shrinkage`` a > 0, :math:`C_S` is replaced by :math:`(1 - a) C_S + a \bar\lambda I`, with
    :math:`\bar\lambda = \mathrm{tr}(C_S) / D` its mean eigenvalue (the Ledoit-Wolf form of covariance shrinkage).
    Its small eigenvalues, under-estimated when the pairs are few for D, are no longer amplified without bound, and
    every direction is determined (no rank cap). a = 0 is Lw as published (cirtorch's ``whitenlearn``); a = 1
    ignores the pairs and gives the PCA rotation of the training rows. On the ``clutter`` benchmark, full Lw fitted on
    ``clutter_train`` (612 images, 512-D VGG16 GeM) lost 13 points of mAP against no whitening, and a between 0.25
    and 0.5 gained 2 to 3 (a chosen by leave-objects-out validation on the training set; ``docs/evaluation.md``).

    Args:
        x: Training descriptors of shape :math:`(N, D)`, N >= 2.
        pos_pairs: Matching pairs as int64 (or int32) row indices into ``x``, of shape :math:`(P, 2)`, P >= 1;
            the first column holds the queries. :math:`C_S` is full rank only for at least D linearly independent
            differences; otherwise the output keeps r < D directions (see the rank cap).
        dim: Requested output dimension, ``1 <= dim <= D``; ``None`` requests all D. The output has
            :math:`d = \min(\text{dim}, r)` rows.
        eig_floor: Supported eigenvalues of :math:`C_S` are floored at ``eig_floor`` times the largest, in (0, 1).
        center: The centre :math:`\mu` of the training rows: ``"all"`` (default), the mean of all N rows of ``x``;
            ``"queries"``, the mean of ``x[pos_pairs[:, 0]]`` with repeated queries counted each time, as
            cirtorch's ``whitenlearn`` (``m = X[:, qidxs].mean``).
        shrinkage: The shrinkage intensity a in [0, 1] of :math:`C_S` towards its mean eigenvalue (0: none).

    Returns:
        ``(mean, projection)`` of shapes :math:`(D,)` and :math:`(d, D)`, :math:`d = \min(\text{dim or } D, r)`,
        for :func:`whiten`. ``mean`` is :math:`\mu`.

    Warns:
        UserWarning: Once, if the requested dimension exceeds the rank r of :math:`C_S` (the output keeps r).

    Raises:
        ShapeError: If ``x`` is not 2-D with N >= 2, or ``pos_pairs`` is not :math:`(P, 2)` with P >= 1.
        DTypeError: If ``x`` is not floating point or ``pos_pairs`` not int64/int32.
        DeviceError: If ``pos_pairs`` is not on the device of ``x``.
        TypeError: If ``dim`` is not an int.
        ValueError: If ``dim``, ``eig_floor`` or ``shrinkage`` is out of range, ``center`` is not ``"all"`` or
            ``"queries"``, ``x`` is not finite, an index is out of range, or all pair differences are zero.

    Example:
        >>> x = torch.randn(60, 8)
        >>> pairs = torch.stack([torch.arange(0, 60, 2), torch.arange(1, 60, 2)], dim=1)
        >>> mean, proj = learned_whitening(x, pairs, dim=4)
        >>> mean.shape, proj.shape
        (torch.Size([8]), torch.Size([4, 8]))
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     mean, proj = learned_whitening(x, pairs[:3], center="queries")  # 3 pairs: rank 3
        >>> proj.shape, len(caught)
        (torch.Size([3, 8]), 1)
    """
    mean, projection = _learned_whitening64(
        x, pos_pairs, dim, eig_floor, "learned_whitening", center=center, shrinkage=shrinkage
    )
    return mean.to(x.dtype), projection.to(x.dtype)


def whiten(x: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    r"""Apply a whitening: :math:`(x - \mu) P^\top`.

    The result is **not** re-normalised (:class:`deepagg.nn.Whiten` L2-normalises it; do the same with
    :func:`deepagg.functional.l2n` when using this function for retrieval). Computed in at least float32 (and in
    the widest dtype of the three inputs), returned in the dtype of ``x``; differentiable in all three inputs.

    Args:
        x: Descriptors of shape :math:`(B, D)`; B = 0 works.
        mean: The training mean :math:`\mu` of shape :math:`(D,)`.
        projection: The projection :math:`P` of shape :math:`(d, D)`.

    Returns:
        Whitened descriptors of shape :math:`(B, d)`, in the dtype of ``x``.

    Raises:
        ShapeError: If the shapes do not match.
        DTypeError: If an input is not floating point.
        DeviceError: If the inputs are on different devices.

    Example:
        >>> mean, proj = pca_whitening(torch.randn(100, 16), dim=8)
        >>> whiten(torch.randn(5, 16), mean, proj).shape
        torch.Size([5, 8])
    """
    bound = check_shape(x, "B,D", name="x", fn="whiten", hint="Pass descriptors as rows.")
    check_shape(mean, "D", name="mean", fn="whiten", sizes={"D": bound["D"]})
    check_shape(projection, "d,D", name="projection", fn="whiten", sizes={"D": bound["D"]})
    for name, t in (("x", x), ("mean", mean), ("projection", projection)):
        check_floating(t, name=name, fn="whiten")
    check_same_device({"x": x, "mean": mean, "projection": projection}, fn="whiten")
    dtype = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), projection.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    out = (x.to(dtype) - mean.to(dtype)) @ projection.to(dtype).T
    return out.to(x.dtype)
