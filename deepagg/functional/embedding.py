r"""Per-feature embeddings (T-emb, VLAD, Fisher) and democratic aggregation weights for local features.

Hoang, Do, Le Tan, Cheung, "Selective deep convolutional features for image retrieval", ACM MM 2017
(``selective-masks-temb-democratic.txt``, sec. 4). Local features are rows :math:`(B, N, d)` with an optional
bool validity ``mask`` :math:`(B, N)` (True = valid). The paper embeds every local feature separately
(sec. 4.2), so that any aggregation can follow; the three embeddings act on one feature at a time and take no
mask (a padded row gives a padded output row, garbage included), while :func:`democratic_weights` takes the mask
and ignores whatever the padded rows hold.

- :func:`triangulation_embedding` (eq. 6, Jégou and Zisserman, CVPR 2014): per anchor :math:`c_j` the
  L2-normalised residual :math:`(x - c_j) / \|x - c_j\|`, blocks concatenated in anchor order. The mean removal and
  whitening of T-emb are separate, learned steps (:mod:`deepagg.functional.whitening`).
- :func:`vlad_embedding` (eq. 5, Jégou et al., CVPR 2010): the residual to the nearest centroid in its block,
  zeros elsewhere; summing over the N features gives the unnormalised VLAD vector.
- :func:`fisher_embedding` (eq. 4, Perronnin et al., ECCV 2010): the per-feature Fisher vector of a diagonal GMM,
  laid out as :math:`[u_1, \dots, u_k, v_1, \dots, v_k]` (VLFeat ``vl_fisher``'s order).
- :func:`democratic_weights` (sec. 4.3, Jégou and Zisserman, CVPR 2014): the modified Sinkhorn iteration of the
  authors' ``sinkhornm.m`` on the Gram matrix of the embedded features, negatives clipped to 0.

Codebooks are fitted by :func:`kmeans` (greedy k-means++ seeding, Lloyd iterations) and :func:`fit_gmm` (EM for a
diagonal GMM initialised from k-means, as VLFeat's ``vl_gmm(..., 'Initialization', 'kmeans')``). The four tensor
functions are batched, free of host synchronisation and compile with ``torch.compile(fullgraph=True)``; the two
fitting utilities read values to the host (convergence tests, empty-cluster handling) and are exempt.
"""

from __future__ import annotations

import math

import torch

from deepagg._checks import (
    ShapeError,
    check_dtype,
    check_floating,
    check_int,
    check_same_device,
    check_shape,
)

__all__ = [
    "democratic_weights",
    "fisher_embedding",
    "fit_gmm",
    "kmeans",
    "triangulation_embedding",
    "vlad_embedding",
]

#: Rows of ``x`` per block of the (rows x k) distance matrices of :func:`kmeans` and :func:`fit_gmm`: about
#: 2**22 entries (16 MiB in float32) per block, whatever k is.
_BLOCK_ENTRIES = 1 << 22
#: EM stops when the mean log-likelihood changes by less than this fraction of itself (VLFeat's criterion).
_GMM_TOL = 1e-5


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The widest floating dtype of ``tensors``, at least float32 (house style: solvers, exp and log in >= fp32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_local(x: torch.Tensor, fn: str, name: str = "x") -> tuple[int, int, int]:
    bound = check_shape(x, "B,N,d", name=name, fn=fn, hint="Pass local features as rows (B, N, d).")
    check_floating(x, name=name, fn=fn)
    return bound["B"], bound["N"], bound["d"]


def _check_codebook(t: torch.Tensor, spec: str, name: str, fn: str, sizes: dict[str, int]) -> dict[str, int]:
    bound = check_shape(t, spec, name=name, fn=fn, sizes=sizes)
    check_floating(t, name=name, fn=fn)
    return bound


def _check_mask(mask: torch.Tensor | None, b: int, n: int, fn: str) -> None:
    if mask is None:
        return
    check_shape(mask, "B,N", name="mask", fn=fn, sizes={"B": b, "N": n}, hint="True marks a valid feature.")
    check_dtype(mask, (torch.bool,), name="mask", fn=fn)


def _residuals(x: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x[..., None, :] - codebook``: the (B, N, k, d) residuals to every codeword, in ``dtype``."""
    return x.to(dtype).unsqueeze(-2) - codebook.to(dtype)


def triangulation_embedding(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    r"""Triangulation embedding (T-emb) of every local feature: its L2-normalised residuals to the anchors.

    Eq. 6 of Hoang et al. (ACM MM 2017), from Jégou and Zisserman, "Triangulation embedding and democratic
    aggregation for image search", CVPR 2014:
    :math:`\phi_\Delta(x) = [\dots, (x - c_j)^\top / \|x - c_j\|, \dots]^\top`. Block j (columns
    ``j*d:(j+1)*d``) belongs to anchor j, so the output has ``k * d`` columns. No mean is removed and nothing is
    whitened here: the authors' ``triemb_res`` subtracts a learned mean afterwards, and T-emb's whitening is a
    separate learned step.

    A residual of exactly zero (a feature equal to an anchor) gives a zero block. The authors' code gives NaN
    there: its normaliser ``yael_vecs_normalize`` has the zero-norm guard commented out. The block's gradient
    there is 0. Computed in at least float32 (the widest dtype of the inputs); returned in the dtype of ``x``.
    Differentiable in ``x`` and ``anchors``. Padded rows of a batch give padded output rows (the embedding acts on
    one feature at a time); mask them in the aggregation.

    Args:
        x: Local features of shape :math:`(B, N, d)`.
        anchors: Anchor points (k-means centroids) of shape :math:`(k, d)`.

    Returns:
        Embedded features of shape :math:`(B, N, k d)`, each non-zero block of unit L2 norm.

    Raises:
        ShapeError: If ``x`` is not 3-D, ``anchors`` is not 2-D, or their ``d`` differ.
        DTypeError: If either is not floating point.
        DeviceError: If they are on different devices.

    Example:
        >>> triangulation_embedding(torch.randn(2, 50, 8), torch.randn(4, 8)).shape
        torch.Size([2, 50, 32])
    """
    fn = "triangulation_embedding"
    b, n, d = _check_local(x, fn)
    k = _check_codebook(anchors, "k,d", "anchors", fn, {"d": d})["k"]
    check_same_device({"x": x, "anchors": anchors}, fn=fn)
    r = _residuals(x, anchors, _compute_dtype(x, anchors))  # (B, N, k, d)
    sq = (r * r).sum(dim=-1, keepdim=True)
    nonzero = sq > 0
    # Double where: the rsqrt branch never sees 0, so the gradient at a zero residual is 0, not NaN.
    inv = torch.where(nonzero, torch.rsqrt(torch.where(nonzero, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    return (r * inv).reshape(b, n, k * d).to(x.dtype)


def vlad_embedding(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    r"""Per-feature VLAD: the residual to the nearest centroid in that centroid's block, zeros elsewhere.

    Eq. 5 of Hoang et al. (ACM MM 2017), from Jégou et al., "Aggregating local descriptors into a compact image
    representation", CVPR 2010: :math:`\phi_{VLAD}(x) = [\dots, q_i (x - c_i)^\top, \dots]^\top` with
    :math:`q_i = 1` for the nearest centroid (squared L2 distance, computed from the residuals themselves; ties go
    to the lower index) and 0 otherwise. Summing the output over the N features gives the unnormalised VLAD vector
    of the image. The assignment is a hard choice: gradients flow through the residual only. Computed in at least
    float32; returned in the dtype of ``x``.

    Args:
        x: Local features of shape :math:`(B, N, d)`.
        centroids: Visual words of shape :math:`(k, d)`, k >= 1.

    Returns:
        Embedded features of shape :math:`(B, N, k d)`; block j (columns ``j*d:(j+1)*d``) is non-zero only for the
        features assigned to centroid j.

    Raises:
        ShapeError: If ``x`` is not 3-D, ``centroids`` is not 2-D or has no row, or their ``d`` differ.
        DTypeError: If either is not floating point.
        DeviceError: If they are on different devices.

    Example:
        >>> vlad_embedding(torch.randn(2, 50, 8), torch.randn(4, 8)).shape
        torch.Size([2, 50, 32])
    """
    fn = "vlad_embedding"
    b, n, d = _check_local(x, fn)
    k = _check_codebook(centroids, "k,d", "centroids", fn, {"d": d})["k"]
    if k < 1:
        raise ShapeError(
            f"{fn}(): centroids must have at least one row (k >= 1); got shape {tuple(centroids.shape)}.",
            expected="k >= 1",
            actual=tuple(centroids.shape),
        )
    check_same_device({"x": x, "centroids": centroids}, fn=fn)
    r = _residuals(x, centroids, _compute_dtype(x, centroids))  # (B, N, k, d)
    dist = (r * r).sum(dim=-1)  # (B, N, k), exact ties stay exact
    nearest = dist.argmin(dim=-1, keepdim=True)  # argmin returns the first minimum: ties -> lower index
    codes = torch.arange(k, device=x.device)
    q = (codes == nearest).to(r.dtype).unsqueeze(-1)  # (B, N, k, 1) one-hot
    return (r * q).reshape(b, n, k * d).to(x.dtype)


def fisher_embedding(
    x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    r"""Per-feature Fisher vector of a diagonal-covariance GMM (means and variances parts).

    Eq. 4 of Hoang et al. (ACM MM 2017), from Perronnin, Sánchez and Mensink, ECCV 2010. With the GMM
    :math:`\{w_i, \mu_i, \sigma_i^2\}_{i=1}^k` and the posteriors :math:`p_i(x)` (computed in the log domain with a
    log-softmax, so far-away features do not underflow to 0/0),

    .. math::
        u_i = \frac{p_i(x)}{\sqrt{w_i}} \frac{x - \mu_i}{\sigma_i}, \qquad
        v_i = \frac{p_i(x)}{\sqrt{2 w_i}} \left[\left(\frac{x - \mu_i}{\sigma_i}\right)^2 - 1\right].

    The layout is :math:`[u_1, \dots, u_k, v_1, \dots, v_k]`: all mean blocks, then all variance blocks, the order of
    VLFeat's ``vl_fisher`` (``uk = enc + i*d``, ``vk = enc + i*d + k*d``) and of the paper's :math:`2kd` count.
    Averaging the output over the N features gives VLFeat's unnormalised Fisher vector. ``variances`` and
    ``weights`` must be positive (values are not checked: that would synchronise with the device). Computed in at
    least float32 (the widest input dtype); returned in the dtype of ``x``. Differentiable in all four inputs.

    Args:
        x: Local features of shape :math:`(B, N, d)`.
        means: GMM means :math:`\mu` of shape :math:`(k, d)`.
        variances: Diagonal covariances :math:`\sigma^2` (variances, not standard deviations) of shape
            :math:`(k, d)`, > 0.
        weights: Mixture weights of shape :math:`(k,)`, > 0 (normally summing to 1).

    Returns:
        Embedded features of shape :math:`(B, N, 2 k d)`: columns ``i*d:(i+1)*d`` hold :math:`u_i` and columns
        ``(k+i)*d:(k+i+1)*d`` hold :math:`v_i`.

    Raises:
        ShapeError: If a shape is wrong or ``d``/``k`` differ between the arguments.
        DTypeError: If an argument is not floating point.
        DeviceError: If the arguments are on different devices.

    Example:
        >>> mu, var, w = torch.randn(4, 8), torch.ones(4, 8), torch.full((4,), 0.25)
        >>> fisher_embedding(torch.randn(2, 50, 8), mu, var, w).shape
        torch.Size([2, 50, 64])
    """
    fn = "fisher_embedding"
    b, n, d = _check_local(x, fn)
    k = _check_codebook(means, "k,d", "means", fn, {"d": d})["k"]
    _check_codebook(variances, "k,d", "variances", fn, {"k": k, "d": d})
    _check_codebook(weights, "k", "weights", fn, {"k": k})
    check_same_device({"x": x, "means": means, "variances": variances, "weights": weights}, fn=fn)
    dtype = _compute_dtype(x, means, variances, weights)
    var = variances.to(dtype)
    w = weights.to(dtype)
    z = _residuals(x, means, dtype) * torch.rsqrt(var)  # (B, N, k, d) standardised residuals
    # log w_i + log N(x; mu_i, sigma_i^2) up to the constant -d/2 log(2 pi), which the softmax cancels.
    logits = torch.log(w) - 0.5 * torch.log(var).sum(dim=-1) - 0.5 * (z * z).sum(dim=-1)  # (B, N, k)
    post = torch.softmax(logits, dim=-1).unsqueeze(-1)  # (B, N, k, 1)
    u = post * torch.rsqrt(w)[:, None] * z
    v = post * torch.rsqrt(2 * w)[:, None] * (z * z - 1)
    return torch.cat([u.reshape(b, n, k * d), v.reshape(b, n, k * d)], dim=-1).to(x.dtype)


def _check_damping(damping: float, fn: str) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
        raise ValueError(f"{fn}(): damping must be a finite float >= 0; got {damping!r}.")
    return float(damping)


def democratic_weights(
    phi: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    iters: int = 10,
    damping: float = 0.5,
) -> torch.Tensor:
    r"""Democratic aggregation weights: the damped Sinkhorn iteration on the clipped Gram matrix of each image.

    Sec. 4.3 of Hoang et al. (ACM MM 2017), from Jégou and Zisserman, CVPR 2014; the iteration is the authors'
    ``qdemocratic.m``/``sinkhornm.m``. Per image, with the embedded features :math:`\phi_i` as rows,
    :math:`G = \max(\Phi \Phi^\top, 0)` (negative similarities clipped to 0) and :math:`w = \mathbf{1}`; each of
    ``iters`` iterations does

    .. math:: \delta = 1 / (\mathbf{1}^\top G)^{\text{damping}}, \quad G \leftarrow \mathrm{diag}(\delta)\, G\,
        \mathrm{diag}(\delta), \quad w \leftarrow w \odot \delta.

    Since :math:`G_t = \mathrm{diag}(w_t)\, G_0\, \mathrm{diag}(w_t)`, the column sums are computed as
    :math:`w_t \odot (G_0 w_t)` (one matrix-vector product per iteration; the same numbers as rescaling G). The
    iteration drives every feature's total weighted similarity :math:`w_i \sum_j G_{0,ij} w_j` towards 1, i.e.
    towards equal contributions to :math:`\|\sum_i w_i \phi_i\|^2`; ``damping`` = 0.5 and 10 iterations are the
    authors' values, ``damping`` = 1 is the undamped iteration, 0 leaves the weights at 1.

    Masked features get weight 0 and change nothing for the others (their rows and columns of G are zero, and
    whatever they hold, inf and NaN included, is never read). A valid but zero feature (column sum 0) also gets
    weight 0, at every ``iters`` including 0 (zero local features take no part in any weighting; the authors'
    code would divide by zero there); so does every feature of an image whose mask is all False. Computed in at
    least float32; returned in the dtype of ``phi``. Differentiable in ``phi`` (where the clipped entries are
    not exactly 0).

    Args:
        phi: Embedded local features of shape :math:`(B, N, D)`, e.g. from :func:`triangulation_embedding`.
        mask: Optional bool validity mask of shape :math:`(B, N)`, True = valid.
        iters: Number of iterations, an int >= 0.
        damping: The exponent of the column sums, a finite float >= 0.

    Returns:
        Weights of shape :math:`(B, N)`, >= 0, 0 at masked and zero features.

    Raises:
        ShapeError: If ``phi`` is not 3-D or ``mask`` does not match it.
        DTypeError: If ``phi`` is not floating point or ``mask`` is not bool.
        DeviceError: If ``mask`` is on another device.
        TypeError: If ``iters`` is not an int.
        ValueError: If ``iters`` < 0 or ``damping`` is not a finite float >= 0.

    Example:
        >>> phi = torch.randn(2, 50, 64)
        >>> w = democratic_weights(phi)
        >>> w.shape
        torch.Size([2, 50])
        >>> (w[:, :, None] * phi).sum(1).shape  # the democratic aggregate
        torch.Size([2, 64])
    """
    fn = "democratic_weights"
    bound = check_shape(phi, "B,N,D", name="phi", fn=fn, hint="Pass embedded local features as rows.")
    b, n = bound["B"], bound["N"]
    check_floating(phi, name="phi", fn=fn)
    _check_mask(mask, b, n, fn)
    check_same_device({"phi": phi, "mask": mask}, fn=fn)
    iters = check_int(iters, name="iters", fn=fn, minimum=0)
    damping = _check_damping(damping, fn)
    dtype = _compute_dtype(phi)
    f = phi.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=phi.device)
    if mask is not None:
        f = torch.where(mask.unsqueeze(-1), f, zero)  # padding becomes exactly 0: garbage cannot leak
    gram = (f @ f.transpose(-1, -2)).clamp(min=0)  # (B, N, N), symmetric
    one = torch.ones((), dtype=dtype, device=phi.device)
    w = (gram.sum(dim=-1) > 0).to(dtype)  # 1, and 0 for zero (and masked) features
    for _ in range(iters):
        colsum = w * (gram @ w.unsqueeze(-1)).squeeze(-1)
        positive = colsum > 0
        safe = torch.where(positive, colsum, one)  # double where: no inf/NaN in the value or the gradient
        w = w * torch.where(positive, safe.pow(-damping), zero)
    return w.to(phi.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Fitting utilities (not compiled: they read values to the host).
# ----------------------------------------------------------------------------------------------------------------


def _check_training(x: torch.Tensor, k: int, fn: str) -> tuple[int, int, int]:
    bound = check_shape(x, "N,d", name="x", fn=fn, hint="Pass training features as rows.")
    check_floating(x, name="x", fn=fn)
    k = check_int(k, name="k", fn=fn, minimum=1)
    n, d = bound["N"], bound["d"]
    if n < k:
        raise ShapeError(
            f"{fn}(): x must have at least k = {k} rows; got shape {tuple(x.shape)}.",
            expected=f"N >= {k}",
            actual=tuple(x.shape),
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}(): x must be finite; got inf or NaN entries.")
    return n, d, k


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` float64 draws in [0, 1) from ``generator`` (the global RNG of ``device`` when None), on ``device``."""
    if generator is None:
        return torch.rand(n, dtype=torch.float64, device=device)
    return torch.rand(n, dtype=torch.float64, generator=generator, device=generator.device).to(device)


def _kmeanspp(x: torch.Tensor, sq_x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy k-means++ seeding: indices (k,) of the seeds, every draw from ``generator``.

    Arthur and Vassilvitskii (SODA 2007) draw each next seed with probability proportional to the squared
    distance to the nearest seed so far; the greedy variant (their sec. 6, scikit-learn's default) draws
    ``2 + floor(log k)`` candidates that way and keeps the one that lowers the k-means potential most (ties: the
    first drawn), which misses well-separated clusters far less often.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = min(int(_uniform(1, generator, x.device)[0] * n), n - 1)
    chosen = [first]
    # Squared distance to the nearest seed so far, as |x|^2 - 2 x.c + |c|^2 (one product per step).
    closest = torch.addmv(sq_x, x, x[first], alpha=-2.0).add_(sq_x[first]).clamp_(min=0)
    closest[first] = 0
    for _ in range(1, k):
        cum = torch.cumsum(closest, dim=0, dtype=torch.float64)
        total = cum[-1]
        u = _uniform(trials, generator, x.device)
        if float(total) > 0:
            # The first index whose cumulative mass exceeds u * total: a point at distance 0 (a seed, a duplicate)
            # has no mass and is never drawn.
            cand = torch.searchsorted(cum, u * total, right=True).clamp_(max=n - 1)
        else:  # fewer than k distinct points: any points
            cand = (u * n).long().clamp_(max=n - 1)
        dist = torch.addmm(sq_x[:, None], x, x[cand].T, alpha=-2.0).add_(sq_x[cand]).clamp_(min=0)  # (N, trials)
        dist[cand, torch.arange(trials, device=x.device)] = 0
        dist = torch.minimum(dist, closest[:, None])
        best = int(dist.sum(dim=0, dtype=torch.float64).argmin())
        chosen.append(int(cand[best]))
        closest = dist[:, best].contiguous()
    return torch.tensor(chosen, device=x.device)


def _nearest(x: torch.Tensor, sq_x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest centroid (N,) of every row, its distance (N,) and the distance to the second nearest (N,).

    Squared distances are ``|x|^2 - 2 x.c + |c|^2`` in blocks of rows (ties: the lower index); with one centroid
    the second distance is inf.
    """
    n, k = x.shape[0], c.shape[0]
    step = max(1, _BLOCK_ENTRIES // k)
    sq_c = (c * c).sum(dim=1)
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    best = torch.empty(n, dtype=x.dtype, device=x.device)
    second = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    for i in range(0, n, step):
        d2 = torch.addmm(sq_c, x[i : i + step], c.T, alpha=-2.0).add_(sq_x[i : i + step, None])
        val, idx = d2.min(dim=1)  # the first minimum: ties go to the lower index
        labels[i : i + step] = idx
        best[i : i + step] = val
        if k > 1:
            second[i : i + step] = d2.scatter_(1, idx[:, None], math.inf).amin(dim=1)
    return labels, best.clamp_(min=0).sqrt_(), second.clamp_(min=0).sqrt_()


def _sums(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    minus: torch.Tensor | None = None,
    square: bool = False,
) -> torch.Tensor:
    """Per-label sums (k, d) in float64 of the rows of ``x`` (or of their squares), minus those under ``minus``.

    One (k x rows) indicator-matrix product per block of rows: on the CPU this is many times faster than
    ``index_add_``, which is slow for few, long rows.
    """
    out = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    codes = torch.arange(k, device=x.device)[:, None]
    step = max(1, _BLOCK_ENTRIES // max(1, x.shape[1], k))
    for i in range(0, len(x), step):
        rows = x[i : i + step]
        onehot = (labels[i : i + step] == codes).to(x.dtype)  # (k, rows)
        if minus is not None:
            onehot -= (minus[i : i + step] == codes).to(x.dtype)
        out += (onehot @ (rows * rows if square else rows)).to(torch.float64)
    return out


def _reseed_empty(
    x: torch.Tensor, c: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor
) -> torch.Tensor:
    """Give each empty cluster (ascending) the next row farthest from its centroid ``c`` (ties: lower index).

    A row is never taken from a cluster it is alone in. ``counts`` and ``sums`` are updated in place; returns
    the new labels.
    """
    step = max(1, _BLOCK_ENTRIES // max(1, x.shape[1]))
    dists = torch.cat([((x[i : i + step] - c[labels[i : i + step]]) ** 2).sum(dim=1) for i in range(0, len(x), step)])
    order = torch.sort(dists, descending=True, stable=True).indices
    labels = labels.clone()
    taken = 0
    for j in torch.nonzero(counts == 0).flatten().tolist():
        while True:
            i = int(order[taken])
            taken += 1
            if int(counts[labels[i]]) > 1:
                break
        old = int(labels[i])
        row = x[i].to(torch.float64)
        counts[old] -= 1
        counts[j] += 1
        sums[old] -= row
        sums[j] += row
        labels[i] = j
    return labels


def _kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (k, d) and labels (N,) of ``x`` in its compute dtype (already validated).

    Lloyd's iteration, with Hamerly's bounds (SDM 2010) to skip the rows that provably keep their centroid: an
    upper bound ``upper`` on the distance to the assigned centroid and a lower bound ``lower`` on the distance to
    every other one. When the centroids move by ``shift``, ``upper += shift[label]`` and
    ``lower -= max(shift)``; only the rows with ``upper >= lower`` (minus a rounding margin) are reassigned, with
    exact distances. The assignment is the same as plain Lloyd's (up to rounding-level near-ties), and so is the
    stopping rule (no row changes its centroid); late iterations cost a few passes over N instead of an N x k
    product. The per-cluster sums and counts are updated incrementally (float64), and the returned centroids are
    the exact means of the final assignment.
    """
    rows = x
    mean = x.mean(dim=0)
    x = x - mean  # centred: the |x|^2 - 2 x.c + |c|^2 expansion loses less to cancellation
    n = x.shape[0]
    sq_x = (x * x).sum(dim=1)
    seeds = _kmeanspp(x, sq_x, k, generator)
    centroids = x[seeds]
    if iters == 0:  # the seeds themselves, exactly rows of x
        return rows[seeds], _nearest(x, sq_x, centroids)[0]
    max_sq_x = float(sq_x.max())
    eps = torch.finfo(x.dtype).eps
    labels, upper, lower = _nearest(x, sq_x, centroids)  # the assignment step of the first iteration
    sums = _sums(x, labels, k)
    counts = torch.bincount(labels, minlength=k)
    for it in range(iters):
        # Update step.
        if bool((counts == 0).any()):
            labels = _reseed_empty(x, centroids, labels, counts, sums)
            upper.fill_(math.inf)  # every row is rechecked in the next assignment
        if it == iters - 1:
            break
        new_c = (sums / counts[:, None]).to(x.dtype)
        # Assignment step of the next iteration, on the rows whose bounds allow a change only.
        shift = (new_c - centroids).norm(dim=1)
        centroids = new_c
        upper += shift[labels]
        lower -= shift.max()
        # Rounding margin: the computed squared distances are off by about eps (|x|^2 + |c|^2), the distances by
        # at most the square root of that.
        margin = 2 * math.sqrt(16 * eps * (max_sq_x + float((centroids * centroids).sum(dim=1).max())))
        stale = upper + margin >= lower
        cand = torch.nonzero(stale).flatten()
        if cand.numel() > n // 2:  # most rows: one pass over all, no gather
            new, upper, lower = _nearest(x, sq_x, centroids)
            moved = torch.nonzero(new != labels).flatten()
            new_moved = new[moved]
        else:
            new, upper[cand], lower[cand] = _nearest(x[cand], sq_x[cand], centroids)
            changed = new != labels[cand]
            moved, new_moved = cand[changed], new[changed]
        if moved.numel() == 0:
            break
        sums += _sums(x[moved], new_moved, k, minus=labels[moved])
        counts += torch.bincount(new_moved, minlength=k) - torch.bincount(labels[moved], minlength=k)
        labels[moved] = new_moved
    # The exact means of the final assignment (the incremental sums drift by rounding).
    centroids = (_sums(x, labels, k) / torch.bincount(labels, minlength=k)[:, None]).to(x.dtype)
    return centroids + mean, labels


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""k-means centroids of the rows of ``x``: k-means++ seeding, then Lloyd iterations.

    The codebook learning of Hoang et al. (ACM MM 2017, sec. 4.2) for T-emb and VLAD. Seeding is greedy k-means++
    (Arthur and Vassilvitskii, SODA 2007; scikit-learn's default): the first seed uniform, then at each step
    ``2 + floor(log k)`` candidates drawn with probability proportional to the squared distance to the nearest seed,
    of which the one that lowers the k-means potential most is kept. Every random draw comes from ``generator``
    (the global RNG when None), so the same generator state gives the same centroids. A generator on another device
    than ``x`` is fine (its draws are moved).

    Each Lloyd iteration assigns every row to its nearest centroid (squared L2, computed as
    :math:`\|x\|^2 - 2 x^\top c + \|c\|^2` on the centred rows, in blocks of rows so that memory stays bounded
    for N in the millions; ties go to the lower index) and moves each centroid to the mean of its rows. Hamerly's
    distance bounds (SDM 2010) skip the rows that provably keep their centroid, so late iterations, where few rows
    move, are cheap; the result is that of plain Lloyd iterations. A cluster that becomes empty is re-seeded
    deterministically with the row farthest from its own centroid (then the next farthest, for several; a row is
    never taken from a cluster it is alone in). The iteration stops early when no assignment changes; the returned
    centroids are the means of the final assignment. With fewer than k distinct rows some centroids coincide.

    Fitting utility: computed in at least float32 (float64 for float64 input), returned in the dtype of ``x``;
    reads values to the host (convergence test, empty clusters), so it is exempt from ``torch.compile``. Not
    differentiable (use the result as a fixed codebook).

    Args:
        x: Training features of shape :math:`(N, d)`, finite, N >= k.
        k: Number of centroids, an int >= 1.
        iters: Maximum number of Lloyd iterations, an int >= 0 (0 returns the k-means++ seeds).
        generator: The source of randomness of the seeding.

    Returns:
        Centroids of shape :math:`(k, d)`.

    Raises:
        ShapeError: If ``x`` is not 2-D or has fewer than k rows.
        DTypeError: If ``x`` is not floating point.
        TypeError: If ``k`` or ``iters`` is not an int.
        ValueError: If ``k`` < 1, ``iters`` < 0, or ``x`` has inf or NaN entries.

    Example:
        >>> x = torch.cat([torch.randn(100, 2), torch.randn(100, 2) + 10])
        >>> kmeans(x, 2, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 2])
    """
    fn = "kmeans"
    with torch.no_grad():
        _, _, k = _check_training(x, k, fn)
        iters = check_int(iters, name="iters", fn=fn, minimum=0)
        centroids, _ = _kmeans(x.to(_compute_dtype(x)), k, iters, generator)
    return centroids.to(x.dtype)


def _gmm_log_joint(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """``log w_i + log N(x; mu_i, diag(var_i))`` for rows of ``x`` (rows, k), by matrix products."""
    inv = 1.0 / var  # (k, d)
    const = log_w - 0.5 * (
        torch.log(var).sum(dim=1) + (means * means * inv).sum(dim=1) + x.shape[1] * math.log(2 * math.pi)
    )
    maha = (x * x) @ inv.T - 2.0 * x @ (means * inv).T  # (rows, k), the x-dependent part of the Mahalanobis term
    return const - 0.5 * maha


def _gmm_m_step(
    mass: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    means: torch.Tensor,
    var: torch.Tensor,
    min_variance: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means, floored variances and weights (float64) from the per-component mass, sum and sum of squares.

    A component with (almost) no mass keeps its previous mean and variances (VLFeat's rule, mass < 1e-6 / k);
    weights are floored at the smallest normal float64 so that their logarithm stays finite.
    """
    alive = (mass >= 1e-6 / len(mass))[:, None]
    safe = torch.where(alive, mass[:, None], torch.ones_like(mass[:, None]))
    new_means = first / safe
    new_var = second / safe - new_means * new_means
    means = torch.where(alive, new_means, means)
    var = torch.where(alive, new_var, var).clamp(min=min_variance)
    weights = (mass / mass.sum()).clamp(min=torch.finfo(torch.float64).tiny)
    return means, var, weights


def fit_gmm(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 100,
    generator: torch.Generator | None = None,
    min_variance: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Fit a diagonal-covariance Gaussian mixture to the rows of ``x`` by EM, initialised from k-means.

    The codebook of the Fisher embedding (Hoang et al., ACM MM 2017, sec. 4.2; :func:`fisher_embedding`). As
    VLFeat's ``vl_gmm(..., 'Initialization', 'kmeans')``: :func:`kmeans` (same ``iters`` and ``generator``) gives
    hard assignments, from which the means, the per-dimension variances (biased, :math:`1/N_i`) and the weights
    :math:`N_i / N` of the initial mixture are computed; then EM runs for at most ``iters`` iterations, stopping
    early when the mean log-likelihood changes by less than 1e-5 of itself (VLFeat's criterion). Posteriors are
    computed in the log domain (log-sum-exp) and the statistics accumulated in float64. Variances are floored at
    ``min_variance`` after every update; a component that receives (almost) no mass, below 1e-6 / k, keeps its
    previous mean and variances (VLFeat's rule), and the returned weights are floored at the smallest normal number
    of the dtype of ``x`` so that :func:`fisher_embedding` never divides by zero. The data are centred (their mean
    subtracted) during the fit to limit cancellation in the variances; the returned means are in the original
    coordinates.

    Fitting utility: computed in at least float32, returned in the dtype of ``x``; reads values to the host and is
    exempt from ``torch.compile``. Not differentiable.

    Args:
        x: Training features of shape :math:`(N, d)`, finite, N >= k.
        k: Number of components, an int >= 1.
        iters: Maximum number of EM iterations (and of the k-means iterations of the initialisation), int >= 0.
        generator: The source of randomness of the k-means seeding.
        min_variance: Floor of every variance, a finite float > 0.

    Returns:
        ``(means, variances, weights)`` of shapes :math:`(k, d)`, :math:`(k, d)` and :math:`(k,)`, the weights
        summing to 1.

    Raises:
        ShapeError: If ``x`` is not 2-D or has fewer than k rows.
        DTypeError: If ``x`` is not floating point.
        TypeError: If ``k`` or ``iters`` is not an int.
        ValueError: If ``k`` < 1, ``iters`` < 0, ``min_variance`` is not a finite float > 0, or ``x`` has inf or NaN
            entries.

    Example:
        >>> x = torch.cat([torch.randn(200, 2), torch.randn(200, 2) + 10])
        >>> means, variances, weights = fit_gmm(x, 2, generator=torch.Generator().manual_seed(0))
        >>> means.shape, variances.shape, weights.shape
        (torch.Size([2, 2]), torch.Size([2, 2]), torch.Size([2]))
    """
    fn = "fit_gmm"
    with torch.no_grad():
        n, d, k = _check_training(x, k, fn)
        iters = check_int(iters, name="iters", fn=fn, minimum=0)
        if (
            isinstance(min_variance, bool)
            or not isinstance(min_variance, (int, float))
            or not 0 < min_variance < float("inf")
        ):
            raise ValueError(f"{fn}(): min_variance must be a finite float > 0; got {min_variance!r}.")
        dtype = _compute_dtype(x)
        center = x.to(dtype).mean(dim=0)
        xc = x.to(dtype) - center  # centred: less cancellation in E[x^2] - mu^2
        _, labels = _kmeans(xc, k, iters, generator)
        # The initial mixture is the M step of the hard k-means assignment (no cluster is empty).
        mass = torch.bincount(labels, minlength=k).to(torch.float64)
        first = _sums(xc, labels, k)
        second = _sums(xc, labels, k, square=True)
        means = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        var = torch.ones(k, d, dtype=torch.float64, device=x.device)
        means, var, weights = _gmm_m_step(mass, first, second, means, var, min_variance)
        step = max(1, _BLOCK_ENTRIES // k)
        previous = -math.inf
        for _ in range(iters):
            # E step, in row blocks: posteriors in the log domain and the sufficient statistics of the M step.
            mass = torch.zeros(k, dtype=torch.float64, device=x.device)
            first = torch.zeros(k, d, dtype=torch.float64, device=x.device)
            second = torch.zeros(k, d, dtype=torch.float64, device=x.device)
            loglik = torch.zeros((), dtype=torch.float64, device=x.device)
            mu, v, log_w = means.to(dtype), var.to(dtype), torch.log(weights).to(dtype)
            for i in range(0, n, step):
                rows = xc[i : i + step]
                joint = _gmm_log_joint(rows, mu, v, log_w)
                norm = torch.logsumexp(joint, dim=1, keepdim=True)
                resp = torch.exp(joint - norm)  # (rows, k)
                loglik += norm.sum(dtype=torch.float64)
                mass += resp.sum(dim=0, dtype=torch.float64)
                first += (resp.T @ rows).to(torch.float64)
                second += (resp.T @ (rows * rows)).to(torch.float64)
            current = float(loglik) / n
            if abs(current - previous) < _GMM_TOL * abs(current):
                break
            previous = current
            means, var, weights = _gmm_m_step(mass, first, second, means, var, min_variance)
    return (
        (means + center.to(torch.float64)).to(x.dtype),
        var.to(x.dtype),
        weights.to(x.dtype).clamp(min=torch.finfo(x.dtype).tiny),
    )
