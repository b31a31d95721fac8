"""Tests of HeW (heat-equation feature weighting) and HeR (heat-equation re-ranking), Pang et al. 2018.

Every expectation comes from the maths (paper sections III-IV and the authors' released MATLAB code HeWR), written
below as slow float64 references: one image / one query at a time, dense ``torch.linalg.inv`` / ``solve`` on a single
(unbatched) matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DTypeError, ShapeError
from deepagg.functional import _blocking, _spd
from deepagg.functional import heat as heat_module
from deepagg.functional._blocking import batch_blocks
from deepagg.functional.heat import heat_rerank, hew, hew_weights

from ._base import BaseTester

# --------------------------------------------------------------------------------------------------------------
# References: HeW weights, one image (C, H, W) at a time, float64.
# --------------------------------------------------------------------------------------------------------------


def _flat(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (n, C) float64 local features, position l = h * W + w."""
    return img.double().reshape(img.shape[0], -1).T.contiguous()


def _valid(img: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    n = img.shape[1] * img.shape[2]
    return torch.ones(n, dtype=torch.bool) if mask is None else mask.reshape(-1).clone()


def _paper_graph(img: torch.Tensor, lam: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Indices of the graph's nodes (valid and non-zero), P (cosine, zero diagonal) and a = P 1 + lam."""
    f = _flat(img)
    valid = _valid(img, mask)
    nonzero = (f != 0).any(1)  # NaN garbage counts as non-zero; the mask removes it
    idx = (valid & nonzero).nonzero().flatten()
    u = f[idx] / f[idx].norm(dim=1, keepdim=True)
    p = u @ u.T  # cosine similarities
    p.fill_diagonal_(0.0)
    a = p.sum(1) + lam
    return idx, p, a


def ref_paper_weights(img: torch.Tensor, lam: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 13: psi_l = sum_m (M^-1)(m, l) / (M^-1)(l, l), M = I - diag(a)^-1 P; w = 1 / psi; 0 off the graph."""
    _, h, w = img.shape
    idx, p, a = _paper_graph(img, lam, mask)
    out = torch.zeros(h * w, dtype=torch.float64)
    m = idx.numel()
    if m > 0:
        minv = torch.linalg.inv(torch.eye(m, dtype=torch.float64) - p / a[:, None])
        psi = torch.stack([minv[:, j].sum() / minv[j, j] for j in range(m)])
        out[idx] = 1.0 / psi
    return out.reshape(h, w)


def ref_paper_weights_eq5(img: torch.Tensor, lam: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The literal eq. 5 + 6: one linear system per heat source l."""
    _, h, w = img.shape
    idx, p, a = _paper_graph(img, lam, mask)
    out = torch.zeros(h * w, dtype=torch.float64)
    m = idx.numel()
    for src in range(m):
        others = [i for i in range(m) if i != src]
        p1 = p[others, src]
        p2 = p[others][:, others]
        lam_l = a[others]
        mu = torch.linalg.solve(torch.eye(m - 1, dtype=torch.float64) - p2 / lam_l[:, None], p1 / lam_l)
        out[idx[src]] = 1.0 / (1.0 + mu.sum())
    return out.reshape(h, w)


def _hewr_affinity(
    img: torch.Tensor,
    mask: torch.Tensor | None,
    center: torch.Tensor | None,
    thr: float,
    zero_rule: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight_Heat.m up to the call of get_potential_inv: the valid indices and the affinity matrix A."""
    f = _flat(img)
    idx = _valid(img, mask).nonzero().flatten()
    fv = f[idx]
    fc = fv - center.double() if center is not None else fv.clone()
    n = fv.shape[0]
    u = torch.zeros_like(fc)
    for i in range(n):
        norm = fc[i].norm()
        if norm > 0:
            u[i] = fc[i] / norm
    a = u @ u.T
    a.fill_diagonal_(0.0)  # A(1:n+1:n^2) = 0
    if zero_rule:
        zero_sum = fv.sum(1) == 0
        a[zero_sum[:, None] & zero_sum[None, :]] = 0.0  # A(ind, ind) = 0
    a[a < thr] = 0.0  # A(A < 0.1) = 0
    return idx, a


def ref_hewr_weights(
    img: torch.Tensor,
    lam: float = 0.1,
    mask: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    thr: float | None = None,
    zero_rule: bool = True,
) -> torch.Tensor:
    """Weight_Heat.m + get_potential_inv.m; isolated nodes get the largest non-isolated weight (1 if all are)."""
    _, h, w = img.shape
    thr = 0.1 if thr is None else thr
    idx, a = _hewr_affinity(img, mask, center, thr, zero_rule)
    n = idx.numel()
    out = torch.zeros(h * w, dtype=torch.float64)
    if n == 0:
        return out.reshape(h, w)
    isolated = torch.tensor([bool((a[i] == 0).all()) for i in range(n)], dtype=torch.bool)
    if bool(isolated.all()):
        out[idx] = 1.0
        return out.reshape(h, w)
    z = lam * a[a > 0].mean()
    aug = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    aug[:n, :n] = a
    aug[:n, n] = z
    aug[n, :n] = 1.0
    aug = aug / aug.sum(1, keepdim=True)
    lap = torch.diag(aug.sum(1)) - aug
    linv = torch.linalg.inv(lap[:n, :n])
    diag = linv.diagonal()
    potential = (linv.sum(0) - diag) / diag / (n + 1)
    wt = 1.0 / potential
    wt[isolated] = wt[~isolated].max()
    out[idx] = wt
    return out.reshape(h, w)


def ref_weights(x: torch.Tensor, variant: str, lam: float, mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, x.shape[2], x.shape[3], dtype=torch.float64)
    out = []
    for b in range(x.shape[0]):
        mb = None if mask is None else mask[b]
        if variant == "paper":
            out.append(ref_paper_weights(x[b], lam, mb))
        else:
            out.append(ref_hewr_weights(x[b], lam, mb, kw.get("center"), kw.get("affinity_threshold")))
    return torch.stack(out)


def ref_hew(
    x: torch.Tensor,
    variant: str,
    lam: float,
    alpha: float = 0.5,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    **kw: Any,
) -> torch.Tensor:
    """clamp(sum_l w_l f_l, eps) ** alpha with the ORIGINAL features, over the valid positions only."""
    wts = ref_weights(x, variant, lam, mask, **kw)
    out = []
    for b in range(x.shape[0]):
        f = _flat(x[b])
        valid = _valid(x[b], None if mask is None else mask[b])
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for i in valid.nonzero().flatten().tolist():
            acc += wts[b].reshape(-1)[i] * f[i]
        out.append(acc.clamp(min=eps) ** alpha)
    return torch.stack(out) if out else torch.zeros(0, x.shape[1], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# References: HeR, one query at a time, float64. They return the reward of each of the k top-ranked items.
# --------------------------------------------------------------------------------------------------------------


def ref_rewards_paper(q: torch.Tensor, db: torch.Tensor, top: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 14 on the centred, re-normalised set {q, top k}: mu = (I - Lambda^-1 Q2)^-1 Lambda^-1 Q1."""
    v = torch.cat([q.double()[None], db.double()[top]])
    v = v - v.mean(0, keepdim=True)
    k1 = v.shape[0]
    for i in range(k1):
        norm = v[i].norm()
        v[i] = v[i] / norm if norm > 0 else v[i] * 0
    s = (v @ v.T).clamp(min=0)
    for i in range(k1):
        s[i, i] = 0.0
    a = s[1:].sum(1) + lam
    q2 = s[1:, 1:]
    q1 = s[1:, 0]
    k = k1 - 1
    return torch.linalg.inv(torch.eye(k, dtype=torch.float64) - q2 / a[:, None]) @ (q1 / a)


def ref_rewards_hewr(q: torch.Tensor, db: torch.Tensor, top: torch.Tensor, lam: float) -> torch.Tensor:
    """cast_rerank.m + get_potential_inv_re: the query's column of the grounded Laplacian's inverse."""
    t = torch.cat([db.double()[top], q.double()[None]])
    t = t - t.mean(0, keepdim=True)
    a = t @ t.T
    n = a.shape[0]
    for i in range(n):
        a[i, i] = 0.0
    a[a < 0] = 0.0
    if not bool((a > 0).any()):
        # MATLAB: Z = mean([]) = NaN. For any finite Z > 0 the grounded Laplacian is I: every reward is 0.
        return torch.zeros(n - 1, dtype=torch.float64)
    z = lam * a[a > 0].mean()
    aug = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    aug[:n, :n] = a
    aug[:n, n] = z
    aug[n, :n] = 1.0
    aug = aug / aug.sum(1, keepdim=True)
    lap = (torch.diag(aug.sum(1)) - aug)[:n, :n]
    linv = torch.linalg.inv(lap)
    return linv[: n - 1, n - 1]


def stable_desc_order(r: torch.Tensor) -> list[int]:
    """Positions sorted by reward, descending; ties keep the old order (MATLAB's stable sort 'descend')."""
    vals = [float(v) for v in r]
    return sorted(range(len(vals)), key=lambda j: (-vals[j], j))


def ref_rerank(
    q: torch.Tensor, db: torch.Tensor, ranks: torch.Tensor, k: int, lam: float, variant: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The re-ranked lists (stable sort of the rewards, descending) and each query's rewards (in old order)."""
    k = min(k, ranks.shape[1])
    out = ranks.clone()
    rewards = []
    fn = ref_rewards_paper if variant == "paper" else ref_rewards_hewr
    for i in range(q.shape[0]):
        top = ranks[i, :k]
        r = fn(q[i], db, top, lam)
        out[i, :k] = top[stable_desc_order(r)]
        rewards.append(r)
    return out, rewards


def assert_rerank(out: torch.Tensor, ranks: torch.Tensor, k: int, rewards: list[torch.Tensor], exact: bool) -> None:
    """Tie-aware: same tail, a permutation of each head, rewards non-increasing; exact order if ``exact``."""
    k = min(k, ranks.shape[1])
    assert out.dtype == torch.int64
    assert out.shape == ranks.shape
    assert torch.equal(out[:, k:], ranks[:, k:])
    for i, r in enumerate(rewards):
        head = ranks[i, :k].tolist()
        got = out[i, :k].tolist()
        assert sorted(got) == sorted(head)
        pos = {d: j for j, d in enumerate(head)}
        seq = [float(r[pos[d]]) for d in got]
        tol = 1e-7 * max(1.0, max(abs(v) for v in seq))
        assert all(seq[j + 1] <= seq[j] + tol for j in range(k - 1)), (i, seq)
    if exact:
        for i, r in enumerate(rewards):
            assert torch.equal(out[i, :k], ranks[i, :k][stable_desc_order(r)]), i


def min_gap(rewards: list[torch.Tensor]) -> float:
    gaps = [float(r.sort().values.diff().min()) for r in rewards if r.numel() > 1]
    return min(gaps) if gaps else float("inf")


# --------------------------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------------------------


def relu_maps(
    *shape: int, seed: int = 0, zero_frac: float = 0.15, dtype: torch.dtype = torch.float64, shift: float = 0.3
) -> torch.Tensor:
    """Non-negative (post-ReLU-like) maps; about ``zero_frac`` of the positions are exact zero vectors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64) + shift)
    b, _, h, w = shape
    zero = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64) < zero_frac
    return x.masked_fill(zero, 0.0).to(dtype)


def positive_maps(*shape: int, seed: int = 0) -> torch.Tensor:
    """Strictly positive, generic maps (no zero vectors, no kinks): for gradcheck."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.2


def random_mask(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, w, generator=g) < 0.75
    m[:, 0, 0] = True
    return m


def retrieval_setup(nq: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clustered unit database, queries near clusters, initial ranks by cosine (best first)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, d, generator=g, dtype=torch.float64)
    db = F.l2n(centers[torch.arange(n) % 4] + 0.9 * torch.randn(n, d, generator=g, dtype=torch.float64))
    q = F.l2n(centers[torch.arange(nq) % 4] + 1.2 * torch.randn(nq, d, generator=g, dtype=torch.float64))
    ranks = torch.argsort(q @ db.T, dim=1, descending=True, stable=True)
    return q, db, ranks


VARIANT_METHODS = [
    ("paper", "auto"),
    ("paper", "cholesky"),
    ("paper", "woodbury"),
    ("hewr", "auto"),
    ("hewr", "cholesky"),
]
VM_IDS = [f"{v}-{m}" for v, m in VARIANT_METHODS]


def _kw(variant: str, center: torch.Tensor | None = None, thr: float | None = None) -> dict[str, Any]:
    if variant == "paper":
        return {}
    return {"center": center, "affinity_threshold": thr}


# --------------------------------------------------------------------------------------------------------------
# hew_weights
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=[None, 3], ids=["lapack-leaf", "recursive"])
def spd_base(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test twice: as shipped (these small systems are one LAPACK leaf) and with the blocked recursions of
    ``_spd.inverse_cholesky_factor`` and ``_spd.cholesky_blocks_`` forced down to 3 x 3 leaves (what n = 3072 or
    C = 512 takes)."""
    if request.param is not None:
        monkeypatch.setattr(_spd, "BASE", request.param)
        monkeypatch.setattr(_spd, "SOLVE_BASE", request.param)


def test_auto_method() -> None:
    # Without autograd the in-place Woodbury path wins from n = C on (measured); with autograd the flop counts
    # decide (crossover near n = 1.4 C).
    assert heat_module._auto_method(512, 512, grad=False) == "woodbury"
    assert heat_module._auto_method(480, 512, grad=False) == "cholesky"
    assert heat_module._auto_method(576, 512, grad=True) == "cholesky"
    assert heat_module._auto_method(768, 512, grad=True) == "woodbury"
    x = torch.empty(2, 512, 24, 24)  # n = 576: Woodbury (and its blocks) only without autograd
    assert heat_module._block_bytes(x, "paper", "auto") == heat_module.WOODBURY_BLOCK_BYTES
    assert heat_module._block_bytes(x.requires_grad_(), "paper", "auto") is None
    with torch.no_grad():
        assert heat_module._block_bytes(x, "paper", "auto") == heat_module.WOODBURY_BLOCK_BYTES


def test_woodbury_blocks() -> None:
    # The Woodbury path of "paper" (and only it) runs over larger blocks of images on CPU.
    big = torch.empty(2, 512, 24, 32)
    assert heat_module._block_bytes(big, "paper", "auto") == heat_module.WOODBURY_BLOCK_BYTES
    assert heat_module._block_bytes(big, "paper", "woodbury") == heat_module.WOODBURY_BLOCK_BYTES
    assert heat_module._block_bytes(big, "paper", "cholesky") is None
    assert heat_module._block_bytes(big, "hewr", "auto") is None
    assert heat_module._block_bytes(torch.empty(2, 512, 4, 4), "paper", "auto") is None  # n = 16 < C: n x n


class TestHeWWeights(BaseTester):
    def test_smoke(self) -> None:
        x = relu_maps(2, 6, 5, 7, dtype=torch.float32)
        for variant in ("paper", "hewr"):
            wts = hew_weights(x, lam=1.0 if variant == "paper" else 0.1, variant=variant)
            assert wts.shape == (2, 5, 7)
            assert wts.dtype == torch.float32
            assert torch.isfinite(wts).all()
            assert (wts >= 0).all()
        assert F.hew_weights is hew_weights
        assert F.hew is hew
        assert F.heat_rerank is heat_rerank

    @pytest.mark.parametrize("batch", [0, 1, 2])
    @pytest.mark.parametrize(("variant", "method"), VARIANT_METHODS, ids=VM_IDS)
    def test_cardinality(self, batch: int, variant: str, method: str, device: torch.device) -> None:
        x = relu_maps(batch, 5, 4, 6).to(device)  # H != W
        wts = hew_weights(x, lam=0.5, variant=variant, method=method)
        assert wts.shape == (batch, 4, 6)
        assert hew(x, lam=0.5, variant=variant, method=method).shape == (batch, 5)
        mask = torch.ones(batch, 4, 6, dtype=torch.bool, device=device)
        assert hew_weights(x, lam=0.5, variant=variant, method=method, mask=mask).shape == (batch, 4, 6)

    @pytest.mark.parametrize(("variant", "method"), VARIANT_METHODS, ids=VM_IDS)
    @pytest.mark.parametrize("shape", [(2, 5, 6, 7), (2, 16, 3, 2)], ids=["n>C", "n<C"])
    @pytest.mark.usefixtures("spd_base")
    def test_reference(self, variant: str, method: str, shape: tuple[int, int, int, int]) -> None:
        x = relu_maps(*shape, seed=1)
        mask = random_mask(shape[0], shape[2], shape[3], seed=2)
        centers = [None, x.mean((0, 2, 3))] if variant == "hewr" else [None]
        for lam in (0.1, 1.0):
            for m in (None, mask):
                for center in centers:
                    kw = _kw(variant, center)
                    got = hew_weights(x, lam=lam, variant=variant, method=method, mask=m, **kw)
                    self.assert_close(got, ref_weights(x, variant, lam, m, **kw), rtol=1e-5, atol=1e-12)

    def test_reference_eq5_equals_eq13(self) -> None:
        # The O(n^4) literal eq. 5 + 6 (one solve per heat source) agrees with eq. 13 (one inverse).
        x = relu_maps(2, 4, 4, 5, seed=3)
        mask = random_mask(2, 4, 5, seed=4)
        for m in (None, mask):
            for lam in (0.2, 2.0):
                eq5 = torch.stack([ref_paper_weights_eq5(x[b], lam, None if m is None else m[b]) for b in range(2)])
                eq13 = ref_weights(x, "paper", lam, m)
                self.assert_close(eq13, eq5, rtol=1e-10, atol=1e-13)
                for method in ("auto", "cholesky", "woodbury"):
                    got = hew_weights(x, lam=lam, mask=m, method=method)
                    self.assert_close(got, eq5, rtol=1e-5, atol=1e-12)

    def test_paper_weight_is_scaled_diagonal_of_inverse(self) -> None:
        # w_l = lam * (K^-1)(l, l) with K = diag(a) - P; and 0 < w_l <= 1 on the graph's nodes.
        x = relu_maps(1, 6, 5, 6, seed=5)
        lam = 0.7
        idx, p, a = _paper_graph(x[0], lam, None)
        kinv = torch.linalg.inv(torch.diag(a) - p)
        expected = torch.zeros(30, dtype=torch.float64)
        expected[idx] = lam * kinv.diagonal()
        got = hew_weights(x, lam=lam)
        self.assert_close(got.reshape(-1), expected, rtol=1e-5, atol=1e-12)
        self.assert_close(ref_paper_weights(x[0], lam).reshape(-1), expected, rtol=1e-10, atol=1e-13)
        on = got.reshape(-1)[idx]
        assert (on > 0).all()
        assert (on <= 1 + 1e-12).all()

    def test_paper_zero_vectors_removed(self) -> None:
        # A zero feature vector gets weight exactly 0 and does not take part in the graph: zeroing it in place is
        # the same as masking it out.
        x = relu_maps(1, 5, 4, 5, seed=6, zero_frac=0.0)
        x[0, :, 1, 2] = 0.0
        x[0, :, 3, 0] = 0.0
        mask = torch.ones(1, 4, 5, dtype=torch.bool)
        mask[0, 1, 2] = False
        mask[0, 3, 0] = False
        garbage = x.clone()
        garbage[0, :, 1, 2] = 7.0
        garbage[0, :, 3, 0] = 3.0
        for method in ("auto", "cholesky", "woodbury"):
            got = hew_weights(x, lam=0.5, method=method)
            assert got[0, 1, 2] == 0
            assert got[0, 3, 0] == 0
            self.assert_close(got, hew_weights(garbage, lam=0.5, mask=mask, method=method), rtol=1e-8, atol=1e-12)

    def test_all_zero_and_single_position(self) -> None:
        x = torch.zeros(2, 3, 2, 3, dtype=torch.float64)
        x[1, :, 1, 1] = torch.tensor([1.0, 2.0, 0.5])
        for method in ("auto", "cholesky", "woodbury"):
            wts = hew_weights(x, lam=1.0, method=method)
            assert torch.isfinite(wts).all()
            self.assert_close(wts[0], torch.zeros(2, 3))
            expected = torch.zeros(2, 3, dtype=torch.float64)
            expected[1, 1] = 1.0  # one node alone: psi = 1
            self.assert_close(wts[1], expected)
        # hewr: a lone node is isolated (weight 1); all-zero maps: every node isolated -> 1, with or without centre.
        for center in (None, torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)):
            wts = hew_weights(x, lam=0.1, variant="hewr", center=center)
            assert torch.isfinite(wts).all()
            self.assert_close(wts, ref_weights(x, "hewr", 0.1, center=center))
            self.assert_close(wts[0], torch.ones(2, 3))
        mask = torch.zeros(2, 2, 3, dtype=torch.bool)
        mask[0, 0, 0] = True  # a zero vector: paper weight 0 (off the graph), hewr weight 1 (isolated)
        mask[1, 1, 1] = True
        mask[1, 0, 2] = True
        self.assert_close(hew_weights(x, lam=0.1, variant="hewr", mask=mask), mask.double())
        expected = torch.zeros(2, 2, 3, dtype=torch.float64)
        expected[1, 1, 1] = 1.0
        self.assert_close(hew_weights(x, lam=1.0, mask=mask), expected)

    def test_hewr_isolated_nodes(self) -> None:
        g = torch.Generator().manual_seed(7)
        x = torch.zeros(1, 4, 3, 4, dtype=torch.float64)
        x[:, :3] = torch.rand(1, 3, 3, 4, generator=g, dtype=torch.float64) + 0.1
        x[0, :, 2, 1] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # orthogonal to every other feature: cos 0 < 0.1
        _, a = _hewr_affinity(x[0], None, None, 0.1)
        isolated = [i for i in range(12) if bool((a[i] == 0).all())]
        assert isolated == [9]  # the reference sees exactly one isolated node
        for method in ("auto", "cholesky"):
            wts = hew_weights(x, lam=0.1, variant="hewr", method=method)
            self.assert_close(wts, ref_weights(x, "hewr", 0.1), rtol=1e-5, atol=1e-12)
            flat = wts.reshape(-1)
            others = torch.cat([flat[:9], flat[10:]])
            self.assert_close(flat[9], others.max(), rtol=1e-5, atol=0.0)
            assert torch.isfinite(flat).all()
        # A zero vector with no centre has a zero unit vector: isolated too.
        y = x.clone()
        y[0, :, 0, 3] = 0.0
        wts = hew_weights(y, lam=0.1, variant="hewr")
        self.assert_close(wts, ref_weights(y, "hewr", 0.1), rtol=1e-5, atol=1e-12)
        self.assert_close(wts[0, 0, 3], wts[0, 2, 1], rtol=1e-5, atol=0.0)
        # A feature equal to the centre: its centred vector is exactly 0, so it is isolated too.
        center = x[0, :, 1, 3].clone()
        _, a = _hewr_affinity(x[0], None, center, 0.1)
        assert bool((a[7] == 0).all())
        wts = hew_weights(x, lam=0.1, variant="hewr", center=center)
        self.assert_close(wts, ref_weights(x, "hewr", 0.1, center=center), rtol=1e-5, atol=1e-12)
        self.assert_close(wts[0, 1, 3], wts.reshape(-1)[a.abs().sum(1) > 0].max(), rtol=1e-5, atol=0.0)
        # A threshold above every affinity isolates everything: every valid weight is 1, masked ones 0.
        mask = random_mask(1, 3, 4, seed=8)
        for thr in (1.5, 10.0):
            wts = hew_weights(x, lam=0.1, variant="hewr", affinity_threshold=thr, mask=mask)
            self.assert_close(wts, mask.double())

    def test_hewr_zero_sum_rule(self) -> None:
        # With a centre, zero features become identical non-zero centred vectors (affinity 1 with each other):
        # the MATLAB `A(ind, ind) = 0` removes those edges. Check the rule changes the result and is applied.
        x = relu_maps(1, 5, 4, 5, seed=9, zero_frac=0.0)
        for pos in ((0, 1), (2, 2), (3, 4)):
            x[0, :, pos[0], pos[1]] = 0.0
        center = x.mean((0, 2, 3))
        with_rule = ref_hewr_weights(x[0], 0.1, None, center)
        without_rule = ref_hewr_weights(x[0], 0.1, None, center, zero_rule=False)
        assert not torch.allclose(with_rule, without_rule, rtol=1e-3)
        for method in ("auto", "cholesky"):
            got = hew_weights(x, lam=0.1, variant="hewr", center=center, method=method)
            self.assert_close(got[0], with_rule, rtol=1e-5, atol=1e-12)
        # The rule looks at the UNCENTRED channel sum, not at zero vectors: two identical signed features with
        # channel sum exactly 0 lose their edge (affinity 1) too.
        y = relu_maps(1, 4, 3, 4, seed=24, zero_frac=0.0)
        y[0, :, 0, 1] = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
        y[0, :, 2, 3] = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
        c_y = y.mean((0, 2, 3))
        with_rule = ref_hewr_weights(y[0], 0.1, None, c_y)
        assert not torch.allclose(with_rule, ref_hewr_weights(y[0], 0.1, None, c_y, zero_rule=False), rtol=1e-3)
        got = hew_weights(y, lam=0.1, variant="hewr", center=c_y)
        self.assert_close(got[0], with_rule, rtol=1e-5, atol=1e-12)

    def test_hewr_threshold(self) -> None:
        x = relu_maps(2, 6, 4, 5, seed=10)
        center = 0.5 * x.mean((0, 2, 3))
        for thr in (0.0, 0.05, 0.3):
            got = hew_weights(x, lam=0.2, variant="hewr", center=center, affinity_threshold=thr)
            self.assert_close(got, ref_weights(x, "hewr", 0.2, center=center, affinity_threshold=thr), rtol=1e-5)
        # None means 0.1 in this variant.
        self.assert_close(
            hew_weights(x, lam=0.2, variant="hewr", center=center),
            hew_weights(x, lam=0.2, variant="hewr", center=center, affinity_threshold=0.1),
        )

    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    def test_bursty(self, variant: str) -> None:
        # 20 copies of one feature + 4 distinct ones: the distinct ones get larger weights than the repeated ones.
        g = torch.Generator().manual_seed(11)
        c = 8
        bulk = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        x = bulk.reshape(1, c, 1, 1).repeat(1, 1, 4, 6)
        distinct = [(0, 5), (1, 2), (2, 0), (3, 3)]
        for i, (r, s) in enumerate(distinct):
            d = torch.rand(c, generator=g, dtype=torch.float64)
            d[i] += 2.0
            x[0, :, r, s] = 0.5 * bulk + d
        kw: dict[str, Any] = {"center": x.mean((0, 2, 3))} if variant == "hewr" else {}
        lam = 0.1 if variant == "hewr" else 1.0
        wts = hew_weights(x, lam=lam, variant=variant, **kw)
        self.assert_close(wts, ref_weights(x, variant, lam, **kw), rtol=1e-5, atol=1e-12)
        is_distinct = torch.zeros(4, 6, dtype=torch.bool)
        for r, s in distinct:
            is_distinct[r, s] = True
        assert wts[0][is_distinct].min() > wts[0][~is_distinct].max()

    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    @pytest.mark.parametrize("garbage", ["large", "nonfinite"])
    @pytest.mark.usefixtures("spd_base")
    def test_padded_batch_equals_single_images(self, variant: str, garbage: str) -> None:
        sizes = [(5, 6), (3, 7), (5, 7), (2, 2)]
        imgs = [relu_maps(1, 6, h, w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
        big_h, big_w = 5, 7
        g = torch.Generator().manual_seed(12)
        batch = 100.0 * torch.rand(len(sizes), 6, big_h, big_w, generator=g, dtype=torch.float64)
        if garbage == "nonfinite":
            batch[0] = float("nan")
            batch[1] = float("inf")
            batch[3, :3] = float("nan")
        mask = torch.zeros(len(sizes), big_h, big_w, dtype=torch.bool)
        for i, (img, (h, w)) in enumerate(zip(imgs, sizes, strict=True)):
            batch[i, :, :h, :w] = img[0]
            mask[i, :h, :w] = True
        center = torch.full((6,), 0.4, dtype=torch.float64) if variant == "hewr" else None
        kw = _kw(variant, center)
        lam = 0.1 if variant == "hewr" else 0.5
        methods = ["auto", "cholesky", "woodbury"] if variant == "paper" else ["auto", "cholesky"]
        for method in methods:
            padded = hew_weights(batch, lam=lam, mask=mask, variant=variant, method=method, **kw)
            assert torch.isfinite(padded).all()
            assert (padded[~mask] == 0).all()
            for i, (img, (h, w)) in enumerate(zip(imgs, sizes, strict=True)):
                single = hew_weights(img, lam=lam, variant=variant, method=method, **kw)
                self.assert_close(padded[i, :h, :w], single[0], rtol=1e-8, atol=1e-12)
                self.assert_close(single, ref_weights(img, variant, lam, **kw), rtol=1e-5, atol=1e-12)
            pooled = hew(batch, lam=lam, mask=mask, variant=variant, method=method, **kw)
            assert torch.isfinite(pooled).all()
            singles = torch.cat([hew(img, lam=lam, variant=variant, method=method, **kw) for img in imgs])
            self.assert_close(pooled, singles, rtol=1e-8, atol=1e-12)

    @pytest.mark.parametrize(("variant", "method"), VARIANT_METHODS, ids=VM_IDS)
    def test_backward_finite(self, variant: str, method: str) -> None:
        # Exact zero vectors (post-ReLU) and non-finite garbage under the mask must not poison the gradient.
        x = relu_maps(2, 5, 4, 6, seed=25, zero_frac=0.25)
        assert (x.abs().sum(1) == 0).any()
        mask = torch.ones(2, 4, 6, dtype=torch.bool)
        mask[0, 3:] = False
        mask[1, :, 4:] = False
        x[0, :, 3:] = float("nan")
        x[1, :, :, 4:] = float("inf")
        x.requires_grad_()
        for center in (None, torch.full((5,), 0.3, dtype=torch.float64)):
            if variant == "paper" and center is not None:
                continue
            kw = _kw(variant, center)
            out = hew(x, lam=0.3, variant=variant, method=method, mask=mask, **kw)
            assert torch.isfinite(out).all()
            (grad,) = torch.autograd.grad(out.sum(), x)
            assert torch.isfinite(grad).all()
            assert (grad.permute(0, 2, 3, 1)[~mask] == 0).all()

    def test_full_mask_equals_no_mask(self) -> None:
        x = relu_maps(2, 5, 4, 6, seed=13)
        mask = torch.ones(2, 4, 6, dtype=torch.bool)
        for variant, method in VARIANT_METHODS:
            self.assert_close(
                hew_weights(x, lam=0.3, variant=variant, method=method, mask=mask),
                hew_weights(x, lam=0.3, variant=variant, method=method),
            )

    def test_module_matches_functional(self) -> None:
        x = relu_maps(2, 6, 5, 4, seed=14, dtype=torch.float32)
        pool = deepagg.HeWPool(lam=0.5)
        self.assert_close(pool(x), F.l2n(hew(x, lam=0.5)))
        mask = random_mask(2, 5, 4, seed=15)
        self.assert_close(pool(x, mask), F.l2n(hew(x, lam=0.5, mask=mask)))
        self.assert_close(pool(x, mask=mask), F.l2n(hew(x, lam=0.5, mask=mask)))

    @pytest.mark.parametrize(
        ("variant", "method", "shape"),
        [
            ("paper", "cholesky", (1, 3, 3, 4)),
            ("paper", "woodbury", (1, 3, 3, 4)),
            ("paper", "cholesky", (2, 4, 2, 3)),
            ("paper", "woodbury", (2, 4, 2, 3)),
            ("hewr", "cholesky", (1, 3, 3, 4)),
            ("hewr", "cholesky", (2, 4, 2, 3)),
        ],
    )
    @pytest.mark.usefixtures("spd_base")
    def test_gradcheck(self, variant: str, method: str, shape: tuple[int, int, int, int]) -> None:
        x = positive_maps(*shape, seed=16)
        kw: dict[str, Any] = {}
        if variant == "hewr":
            # No threshold kink: every off-diagonal affinity sits well above the threshold.
            _, a = _hewr_affinity(x[0], None, None, -1.0)
            off = a[~torch.eye(a.shape[0], dtype=torch.bool)]
            assert off.min() > 0.3
            kw = {"affinity_threshold": 0.05}
        lam = 0.1 if variant == "hewr" else 0.5
        x.requires_grad_()
        assert self.gradcheck(lambda t: hew_weights(t, lam=lam, variant=variant, method=method, **kw), (x,))

    @pytest.mark.usefixtures("spd_base")
    def test_gradcheck_masked(self) -> None:
        x = positive_maps(2, 2, 2, 3, seed=17)
        mask = torch.ones(2, 2, 3, dtype=torch.bool)
        mask[0, 1] = False
        mask[1, 0, 1] = False
        x.requires_grad_()
        for method in ("cholesky", "woodbury"):
            assert self.gradcheck(lambda t, m=method: hew_weights(t, lam=0.5, method=m, mask=mask), (x,))
        assert self.gradcheck(
            lambda t: hew_weights(t, lam=0.1, variant="hewr", affinity_threshold=0.05, mask=mask), (x,)
        )

    @pytest.mark.parametrize(("variant", "method"), VARIANT_METHODS, ids=VM_IDS)
    @pytest.mark.usefixtures("spd_base")
    def test_compile(self, variant: str, method: str) -> None:
        torch._dynamo.reset()  # fn's code object is compiled once per case: 12 cases exceed the recompile limit
        x = relu_maps(2, 4, 5, 6, seed=18, dtype=torch.float32)
        mask = random_mask(2, 5, 6, seed=19)
        kw = _kw(variant, x.mean((0, 2, 3)))

        def fn(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return hew_weights(t, lam=0.2, variant=variant, method=method, mask=m, **kw)

        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        self.assert_close(compiled(x, mask), fn(x, mask))

    def test_noncontiguous(self) -> None:
        x = relu_maps(2, 5, 4, 6, seed=21)
        mask = random_mask(2, 4, 6, seed=22)
        xc = x.to(memory_format=torch.channels_last)
        xt = self.noncontiguous(x)
        assert not xc.is_contiguous()
        assert not xt.is_contiguous()
        mt = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
        center = x.mean((0, 2, 3))
        ct = torch.stack([center, center], 1)[:, 0]
        assert not ct.is_contiguous()
        for variant, method in VARIANT_METHODS:
            kw = _kw(variant, center)
            expected = hew_weights(x, lam=0.3, variant=variant, method=method, mask=mask, **kw)
            for t in (xc, xt):
                self.assert_close(hew_weights(t, lam=0.3, variant=variant, method=method, mask=mt, **kw), expected)
            if variant == "hewr":
                got = hew_weights(xt, lam=0.3, variant=variant, method=method, mask=mask, center=ct)
                self.assert_close(got, expected)

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    def test_dtype_preserved(self, dt: torch.dtype, variant: str) -> None:
        x = relu_maps(2, 4, 5, 6, seed=23)
        xd = x.to(dt)
        lam = 0.5
        center = torch.full((4,), 0.2)
        kw = _kw(variant, center.to(dt))
        wts = hew_weights(xd, lam=lam, variant=variant, **kw)
        assert wts.dtype == dt
        pooled = hew(xd, lam=lam, variant=variant, **kw)
        assert pooled.dtype == dt
        tol = 5e-2 if dt in (torch.float16, torch.bfloat16) else 1e-5
        kw64 = _kw(variant, center.double())
        self.assert_close(wts.double(), ref_weights(xd.double(), variant, lam, **kw64), rtol=tol, atol=tol)
        self.assert_close(pooled.double(), ref_hew(xd.double(), variant, lam, **kw64), rtol=tol, atol=tol)

    def test_exception(self) -> None:
        x = relu_maps(2, 3, 4, 5)
        with pytest.raises(ValueError, match=r"hew_weights\(\): lam must be a finite float > 0; got 0.0"):
            hew_weights(x, lam=0.0)
        with pytest.raises(ValueError, match=r"hew_weights\(\): lam must be a finite float > 0; got -1.0"):
            hew_weights(x, lam=-1.0, variant="hewr")
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=r"hew_weights\(\): lam must be a finite float > 0"):
                hew_weights(x, lam=bad)
        with pytest.raises(ValueError, match=r"hew_weights\(\): variant must be one of \('paper', 'hewr'\); got 'm'"):
            hew_weights(x, lam=1.0, variant="m")
        with pytest.raises(ShapeError, match=r"hew_weights\(\): center must have shape \(C\) with C=3; got \(4\)"):
            hew_weights(x, lam=0.1, variant="hewr", center=torch.zeros(4, dtype=torch.float64))
        with pytest.raises(ShapeError, match=r"hew_weights\(\): center must have shape \(C\)"):
            hew_weights(x, lam=0.1, variant="hewr", center=torch.zeros(1, 3, dtype=torch.float64))
        with pytest.raises(ShapeError, match=r"hew_weights\(\): x must have shape \(B, C, H, W\); got \(3, 4, 5\)"):
            hew_weights(x[0], lam=1.0)
        with pytest.raises(ShapeError, match=r"hew_weights\(\): x must have shape \(B, C, H, W\); got \(1, 2, 3"):
            hew_weights(x[None], lam=1.0)
        with pytest.raises(DTypeError, match=r"hew_weights\(\): x must be a floating-point tensor; got dtype torch"):
            hew_weights(x.long(), lam=1.0)
        with pytest.raises(ShapeError, match=r"hew_weights\(\): mask must have shape \(B, H, W\).*got \(2, 5, 4\)"):
            hew_weights(x, lam=1.0, mask=torch.ones(2, 5, 4, dtype=torch.bool))
        with pytest.raises(ShapeError, match=r"hew_weights\(\): mask must have shape \(B, H, W\)"):
            hew_weights(x, lam=1.0, mask=torch.ones(4, 5, dtype=torch.bool))
        with pytest.raises(RuntimeError, match=r"hew_weights\(\): mask must have at least one True position"):
            hew_weights(x, lam=1.0, mask=torch.zeros(2, 4, 5, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"hew_weights\(\): center is a keyword of variant='hewr' only"):
            hew_weights(x, lam=1.0, center=torch.zeros(3, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"hew_weights\(\): affinity_threshold is a keyword of variant='hewr'"):
            hew_weights(x, lam=1.0, affinity_threshold=0.1)
        with pytest.raises(ValueError, match=r"hew_weights\(\): method='woodbury' is exact only for variant='paper'"):
            hew_weights(x, lam=0.1, variant="hewr", method="woodbury")
        with pytest.raises(ValueError, match=r"method must be one of \('auto', 'cholesky', 'woodbury'\); got 'lu'"):
            hew_weights(x, lam=1.0, method="lu")


# --------------------------------------------------------------------------------------------------------------
# hew / HeWPool
# --------------------------------------------------------------------------------------------------------------


class TestHeW(BaseTester):
    def test_smoke(self) -> None:
        x = relu_maps(2, 6, 5, 7, dtype=torch.float32)
        out = hew(x, lam=1.0)
        assert out.shape == (2, 6)
        assert torch.isfinite(out).all()
        pool = deepagg.HeWPool()
        assert isinstance(pool, torch.nn.Module)
        assert deepagg.nn.HeWPool is deepagg.HeWPool
        assert pool.out_dim(6) == 6
        assert pool.out_dim(512) == 512
        y = pool(x)
        assert y.shape == (2, 6)
        self.assert_close(y.norm(dim=1), torch.ones(2))

    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int) -> None:
        x = relu_maps(batch, 5, 3, 7, dtype=torch.float32)
        assert hew(x, lam=0.5).shape == (batch, 5)
        assert deepagg.HeWPool()(x).shape == (batch, 5)
        pool = deepagg.HeWPool(variant="hewr")
        pool.fit_center(relu_maps(3, 5, 3, 7, seed=1, dtype=torch.float32))
        assert pool(x).shape == (batch, 5)

    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    @pytest.mark.parametrize("alpha", [0.5, 1.0])
    def test_reference(self, variant: str, alpha: float) -> None:
        x = relu_maps(3, 6, 4, 5, seed=2)
        mask = random_mask(3, 4, 5, seed=3)
        kw = _kw(variant, x.mean((0, 2, 3)) if variant == "hewr" else None)
        for m in (None, mask):
            got = hew(x, lam=0.3, alpha=alpha, variant=variant, mask=m, **kw)
            self.assert_close(got, ref_hew(x, variant, 0.3, alpha=alpha, mask=m, **kw), rtol=1e-5, atol=1e-12)
        # eps clamp: a channel that is zero everywhere pools to eps ** alpha.
        y = x.clone()
        y[:, 2] = 0.0
        got = hew(y, lam=0.3, alpha=alpha, eps=1e-3, variant=variant, **kw)
        self.assert_close(got[:, 2], torch.full((3,), 1e-3**alpha, dtype=torch.float64))
        self.assert_close(got, ref_hew(y, variant, 0.3, alpha=alpha, eps=1e-3, **kw), rtol=1e-5, atol=1e-12)

    def test_module_matches_functional(self) -> None:
        x = relu_maps(2, 6, 5, 4, seed=4, dtype=torch.float32)
        mask = random_mask(2, 5, 4, seed=5)
        pool = deepagg.HeWPool(lam=0.4, alpha=0.7, eps=1e-5, method="cholesky")
        expected = F.l2n(hew(x, lam=0.4, alpha=0.7, eps=1e-5, mask=mask, method="cholesky"))
        self.assert_close(pool(x, mask), expected)
        out = pool(x)
        assert out.dtype == torch.float32
        self.assert_close(out.norm(dim=1), torch.ones(2))
        # hewr: lam defaults to 0.1; the centre is the mean local feature of the training maps.
        train = relu_maps(4, 6, 5, 4, seed=6, dtype=torch.float32)
        pool_r = deepagg.HeWPool(variant="hewr", affinity_threshold=0.05)
        pool_r.fit_center(train)
        center = train.double().mean((0, 2, 3))
        self.assert_close(pool_r.center.double(), center, rtol=1e-6, atol=1e-7)
        expected = F.l2n(hew(x, lam=0.1, variant="hewr", center=center.float(), affinity_threshold=0.05, mask=mask))
        self.assert_close(pool_r(x, mask), expected)
        ref = F.l2n(ref_hew(x.double(), "hewr", 0.1, mask=mask, center=center, affinity_threshold=0.05))
        self.assert_close(pool_r(x, mask).double(), ref, rtol=1e-4, atol=1e-5)

    def test_fit_center(self) -> None:
        maps = relu_maps(5, 4, 3, 6, seed=7)
        expected = maps.mean((0, 2, 3))
        for data in (maps, list(maps), [maps[:2], maps[2], *list(maps[3:])], iter([maps[:3], maps[3:]])):
            pool = deepagg.HeWPool(variant="hewr")
            pool.fit_center(data)
            self.assert_close(pool.center.double(), expected, rtol=1e-6, atol=1e-7)
        # With a mask: the mean over the valid positions only.
        mask = random_mask(5, 3, 6, seed=8)
        pool = deepagg.HeWPool(variant="hewr")
        pool.fit_center(maps, mask=mask)
        expected_m = (maps * mask[:, None]).sum((0, 2, 3)) / mask.sum()
        self.assert_close(pool.center.double(), expected_m, rtol=1e-6, atol=1e-7)
        # The centre is a buffer in the state_dict; a fresh module loads it and gives the same output.
        assert "center" in pool.state_dict()
        fresh = deepagg.HeWPool(variant="hewr")
        fresh.load_state_dict(pool.state_dict())
        self.assert_close(fresh.center.double(), expected_m, rtol=1e-6, atol=1e-7)
        x = maps[:2].float()
        self.assert_close(fresh(x), pool(x))

    def test_seq_backbone(self) -> None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), deepagg.HeWPool())
        img = torch.rand(2, 3, 6, 5)
        out = model(img)
        assert out.shape == (2, 8)
        self.assert_close(out.norm(dim=1), torch.ones(2))
        out.sum().backward()
        conv = model[0]
        assert isinstance(conv, torch.nn.Conv2d)
        assert conv.weight.grad is not None
        assert torch.isfinite(conv.weight.grad).all()

    @pytest.mark.parametrize(("variant", "method"), [("paper", "auto"), ("hewr", "auto")])
    def test_gradcheck(self, variant: str, method: str) -> None:
        x = positive_maps(2, 3, 2, 3, seed=9).requires_grad_()
        kw: dict[str, Any] = {"affinity_threshold": 0.05} if variant == "hewr" else {}
        assert self.gradcheck(lambda t: hew(t, lam=0.3, alpha=0.5, variant=variant, method=method, **kw), (x,))

    def test_compile(self) -> None:
        x = relu_maps(2, 4, 5, 6, seed=10, dtype=torch.float32)
        mask = random_mask(2, 5, 6, seed=11)
        pool = deepagg.HeWPool(lam=0.5)
        compiled = torch.compile(pool, backend="eager", fullgraph=True)
        self.assert_close(compiled(x), pool(x))
        self.assert_close(compiled(x, mask), pool(x, mask))
        pool_r = deepagg.HeWPool(variant="hewr")
        pool_r.fit_center(x)
        compiled_r = torch.compile(pool_r, backend="eager", fullgraph=True)
        self.assert_close(compiled_r(x, mask), pool_r(x, mask))

    def test_noncontiguous(self) -> None:
        x = relu_maps(2, 5, 4, 6, seed=12)
        xc = x.to(memory_format=torch.channels_last)
        xt = self.noncontiguous(x)
        for variant in ("paper", "hewr"):
            kw = _kw(variant, x.mean((0, 2, 3)))
            expected = hew(x, lam=0.3, variant=variant, **kw)
            self.assert_close(hew(xc, lam=0.3, variant=variant, **kw), expected)
            self.assert_close(hew(xt, lam=0.3, variant=variant, **kw), expected)
        pool = deepagg.HeWPool(lam=0.3)
        self.assert_close(pool(xc.float()), pool(x.float()))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        x = relu_maps(2, 4, 5, 6, seed=13)
        pool = deepagg.HeWPool(lam=0.5)
        out = pool(x.to(dt))
        assert out.dtype == dt
        tol = 5e-2 if dt in (torch.float16, torch.bfloat16) else 1e-5
        self.assert_close(out.double(), F.l2n(ref_hew(x.to(dt).double(), "paper", 0.5)), rtol=tol, atol=tol)
        pool_r = deepagg.HeWPool(variant="hewr")
        pool_r.fit_center(x.float())
        out_r = pool_r(x.to(dt))
        assert out_r.dtype == dt
        assert torch.isfinite(out_r).all()

    def test_exception_functional(self) -> None:
        # Errors raised through hew() name hew() (house style: the message names the function the user called).
        x = relu_maps(2, 3, 4, 5)
        with pytest.raises(ValueError, match=r"^hew\(\): alpha must be a finite float > 0; got 0.0"):
            hew(x, lam=1.0, alpha=0.0)
        with pytest.raises(ValueError, match=r"^hew\(\): alpha must be a finite float > 0; got -0.5"):
            hew(x, lam=1.0, alpha=-0.5)
        with pytest.raises(ValueError, match=r"^hew\(\): lam must be a finite float > 0; got 0.0"):
            hew(x, lam=0.0)
        with pytest.raises(ValueError, match=r"^hew\(\): variant must be one of \('paper', 'hewr'\); got 'm'"):
            hew(x, lam=1.0, variant="m")
        with pytest.raises(ShapeError, match=r"^hew\(\): x must have shape \(B, C, H, W\); got \(3, 4, 5\)"):
            hew(x[0], lam=1.0)
        with pytest.raises(DTypeError, match=r"^hew\(\): x must be a floating-point tensor"):
            hew(x.long(), lam=1.0)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"HeWPool\(\): lam must be a finite float > 0; got 0.0"):
            deepagg.HeWPool(lam=0.0)
        with pytest.raises(ValueError, match=r"HeWPool\(\): lam must be a finite float > 0; got -0.1"):
            deepagg.HeWPool(lam=-0.1, variant="hewr")
        with pytest.raises(ValueError, match=r"HeWPool\(\): alpha must be a finite float > 0; got 0.0"):
            deepagg.HeWPool(alpha=0.0)
        with pytest.raises(ValueError, match=r"HeWPool\(\): alpha must be a finite float > 0; got -1.0"):
            deepagg.HeWPool(alpha=-1.0)
        with pytest.raises(ValueError, match=r"HeWPool\(\): variant must be one of \('paper', 'hewr'\); got 'm'"):
            deepagg.HeWPool(variant="m")
        x = relu_maps(1, 3, 4, 5, dtype=torch.float32)
        with pytest.raises(RuntimeError, match=r"HeWPool\(variant='hewr'\): call fit_center\(maps\)"):
            deepagg.HeWPool(variant="hewr")(x)
        with pytest.raises(ShapeError, match=r"x must have shape \(B, C, H, W\)"):
            deepagg.HeWPool()(x[0])

    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    def test_cpu_blocks_equal_single_images(self, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
        # Issue 8: on CPU hew and hew_weights run over blocks of images (two per block here).
        x = relu_maps(5, 6, 4, 7, seed=40)
        monkeypatch.setattr(_blocking, "BLOCK_BYTES", 2 * x[0].numel() * x.element_size())
        monkeypatch.setattr(heat_module, "WOODBURY_BLOCK_BYTES", 2 * x[0].numel() * x.element_size())
        assert batch_blocks(x) == 2
        kw = {"variant": variant, **_kw(variant, torch.full((6,), 0.3, dtype=torch.float64))}
        lam = 0.1 if variant == "hewr" else 1.0
        self.assert_close(hew(x, lam=lam, **kw), torch.cat([hew(img[None], lam=lam, **kw) for img in x]))
        weights = hew_weights(x, lam=lam, **kw)
        self.assert_close(weights, torch.cat([hew_weights(img[None], lam=lam, **kw) for img in x]))

    @pytest.mark.parametrize("two_per_block", [True, False], ids=["2-image-blocks", "one-block"])
    @pytest.mark.parametrize("rectangle", [True, False], ids=["padded", "irregular-mask"])
    def test_cpu_padded_blocks(self, rectangle: bool, two_per_block: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        # No autograd: padded images cropped to their rectangles (blocks of at most 4 images), or the padding filled
        # by a clamp (NaN garbage sends a block through torch.where; one block of 5 images, as the Woodbury path's
        # large blocks run); both equal the batched autograd form.
        sizes = [(4, 7), (3, 7), (4, 5), (2, 2), (4, 6)]
        x = relu_maps(5, 6, 4, 7, seed=41)
        mask = torch.zeros(5, 4, 7, dtype=torch.bool)
        for i, (h, w) in enumerate(sizes):
            mask[i, :h, :w] = True
        if not rectangle:
            mask[0, 1, 2] = False
        x[~mask[:, None].expand_as(x)] = float("nan")
        x[1, :, ~mask[1]] = float("inf")
        if two_per_block:
            monkeypatch.setattr(_blocking, "BLOCK_BYTES", 2 * x[0].numel() * x.element_size())
            monkeypatch.setattr(heat_module, "WOODBURY_BLOCK_BYTES", 2 * x[0].numel() * x.element_size())
        fast = hew(x, lam=1.0, mask=mask)
        exact = hew(x.clone().requires_grad_(), lam=1.0, mask=mask).detach()
        assert torch.isfinite(fast).all()
        self.assert_close(fast, exact, rtol=1e-8, atol=1e-12)
        weights = hew_weights(x, lam=1.0, mask=mask)
        assert torch.isfinite(weights).all()
        self.assert_close(weights, hew_weights(x.clone().requires_grad_(), lam=1.0, mask=mask).detach())


# --------------------------------------------------------------------------------------------------------------
# heat_rerank / HeR
# --------------------------------------------------------------------------------------------------------------


class TestHeatRerank(BaseTester):
    def test_smoke(self) -> None:
        q, db, ranks = retrieval_setup(3, 30, 8)
        out = heat_rerank(q.float(), db.float(), ranks, k=10, lam=0.5)
        assert out.shape == (3, 30)
        assert out.dtype == torch.int64
        assert deepagg.nn.HeR is deepagg.HeR
        assert isinstance(deepagg.HeR(), torch.nn.Module)

    @pytest.mark.parametrize("nq", [0, 1, 2])
    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    def test_cardinality(self, nq: int, variant: str) -> None:
        q, db, ranks = retrieval_setup(max(nq, 1), 12, 5)
        q, ranks = q[:nq], ranks[:nq]
        out = heat_rerank(q, db, ranks, k=6, lam=0.3, variant=variant)
        assert out.shape == (nq, 12)
        assert out.dtype == torch.int64
        assert deepagg.HeR(k=6, variant=variant)(q, db, ranks).shape == (nq, 12)

    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    @pytest.mark.parametrize("k", [1, 2, 9, 25, 40])  # 25 = N, 40 > N (capped)
    def test_reference(self, variant: str, k: int) -> None:
        q, db, ranks = retrieval_setup(5, 25, 6, seed=1)
        for lam in (0.1, 1.0):
            expected, rewards = ref_rerank(q, db, ranks, k, lam, variant)
            # No near ties in this data (k = 2 has exact ties: rewards exactly 0), so the order is determined.
            assert all(gap == 0 or gap > 1e-8 for r in rewards for gap in r.sort().values.diff().tolist())
            got = heat_rerank(q, db, ranks, k=k, lam=lam, variant=variant)
            assert_rerank(got, ranks, k, rewards, exact=True)
            assert torch.equal(got, expected)

    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    def test_order_changes(self, variant: str) -> None:
        q, db, ranks = retrieval_setup(4, 40, 8, seed=2)
        expected, rewards = ref_rerank(q, db, ranks, 20, 0.5, variant)
        assert not torch.equal(expected[:, :20], ranks[:, :20])  # the re-ranking does something here
        got = heat_rerank(q, db, ranks, k=20, lam=0.5, variant=variant)
        assert_rerank(got, ranks, 20, rewards, exact=min_gap(rewards) > 1e-8)
        assert not torch.equal(got, ranks)

    @pytest.mark.parametrize("variant", ["paper", "hewr"])
    def test_shortlist_ranks(self, variant: str) -> None:
        # ranks may be a shortlist (Q, K') with K' < N: k is capped at K', the output has the shape of ranks.
        q, db, ranks = retrieval_setup(3, 25, 6, seed=26)
        short = ranks[:, :15]
        for k in (10, 15, 20):
            expected, rewards = ref_rerank(q, db, short, k, 0.5, variant)
            got = heat_rerank(q, db, short, k=k, lam=0.5, variant=variant)
            assert got.shape == (3, 15)
            assert_rerank(got, short, k, rewards, exact=min_gap(rewards) > 1e-8)
            assert torch.equal(got, expected)

    def test_arbitrary_initial_ranks(self) -> None:
        # The initial ranking need not be sorted by similarity (e.g. after another re-ranker).
        q, db, _ = retrieval_setup(3, 20, 6, seed=3)
        g = torch.Generator().manual_seed(4)
        ranks = torch.stack([torch.randperm(20, generator=g) for _ in range(3)])
        for variant in ("paper", "hewr"):
            expected, rewards = ref_rerank(q, db, ranks, 12, 0.4, variant)
            assert min_gap(rewards) > 1e-8
            assert torch.equal(heat_rerank(q, db, ranks, k=12, lam=0.4, variant=variant), expected)

    def test_ties_keep_old_order(self) -> None:
        # Database vectors whose centred similarity to every node is negative have all-zero rows in S (paper) /
        # A (hewr): their reward is exactly 0, a tie, broken by the old rank order (stable sort).
        d = 8
        q = torch.zeros(1, d, dtype=torch.float64)
        q[0, 0] = 1.0
        near = F.l2n(torch.tensor([[1.0, 0.3, 0, 0, 0, 0, 0, 0], [1.0, 0, 0.2, 0, 0, 0, 0, 0]], dtype=torch.float64))
        far = torch.eye(d, dtype=torch.float64)[3:8]
        db = torch.cat([far[:2], near, far[2:]])  # indices 0, 1, 4, 5, 6 are "far"
        ranks = torch.tensor([[6, 2, 4, 0, 3, 5, 1]])
        for variant in ("paper", "hewr"):
            expected, rewards = ref_rerank(q, db, ranks, 7, 0.3, variant)
            r = rewards[0]
            far_pos = [j for j, idx in enumerate(ranks[0].tolist()) if idx in (0, 1, 4, 5, 6)]
            assert all(float(r[j]) == 0.0 for j in far_pos)
            assert expected[0].tolist() == [3, 2, 6, 4, 0, 5, 1]
            got = heat_rerank(q, db, ranks, k=7, lam=0.3, variant=variant)
            assert got[0].tolist() == [3, 2, 6, 4, 0, 5, 1], variant

    def test_module_matches_functional(self) -> None:
        q, db, ranks = retrieval_setup(3, 30, 6, seed=5)
        for variant in ("paper", "hewr"):
            her = deepagg.HeR(k=15, lam=0.7, variant=variant)
            assert torch.equal(her(q, db, ranks), heat_rerank(q, db, ranks, k=15, lam=0.7, variant=variant))
        # hewr: lam defaults to 0.1; k defaults to 800 (capped at N here).
        her = deepagg.HeR(variant="hewr")
        assert torch.equal(her(q, db, ranks), heat_rerank(q, db, ranks, k=800, lam=0.1, variant="hewr"))
        assert torch.equal(
            heat_rerank(q, db, ranks, lam=0.1, variant="hewr"), ref_rerank(q, db, ranks, 30, 0.1, "hewr")[0]
        )

    def test_compile(self) -> None:
        q, db, ranks = retrieval_setup(3, 30, 6, seed=6)
        for variant in ("paper", "hewr"):
            her = deepagg.HeR(k=12, lam=0.5, variant=variant)
            compiled = torch.compile(her, backend="eager", fullgraph=True)
            assert torch.equal(compiled(q.float(), db.float(), ranks), her(q.float(), db.float(), ranks))

    def test_noncontiguous(self) -> None:
        q, db, ranks = retrieval_setup(3, 30, 6, seed=7)
        qn, dbn, rn = self.noncontiguous(q), self.noncontiguous(db), self.noncontiguous(ranks)
        assert not qn.is_contiguous()
        assert not dbn.is_contiguous()
        assert not rn.is_contiguous()
        for variant in ("paper", "hewr"):
            assert torch.equal(
                heat_rerank(qn, dbn, rn, k=14, lam=0.5, variant=variant),
                heat_rerank(q, db, ranks, k=14, lam=0.5, variant=variant),
            )

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        # The output is always int64; low-precision inputs still give a valid re-ranking of the same heads.
        q, db, ranks = retrieval_setup(2, 20, 6, seed=8)
        for variant in ("paper", "hewr"):
            got = heat_rerank(q.to(dt), db.to(dt), ranks, k=10, lam=0.5, variant=variant)
            assert got.dtype == torch.int64
            assert torch.equal(got[:, 10:], ranks[:, 10:])
            assert torch.equal(got[:, :10].sort(1).values, ranks[:, :10].sort(1).values)
            if dt in (torch.float32, torch.float64):
                _, rewards = ref_rerank(q.to(dt).double(), db.to(dt).double(), ranks, 10, 0.5, variant)
                assert_rerank(got, ranks, 10, rewards, exact=min_gap(rewards) > 1e-5)

    def test_exception(self) -> None:
        q, db, ranks = retrieval_setup(2, 10, 4)
        with pytest.raises(ValueError, match=r"heat_rerank\(\): lam must be a finite float > 0; got 0.0"):
            heat_rerank(q, db, ranks, k=5, lam=0.0)
        with pytest.raises(ValueError, match=r"heat_rerank\(\): lam must be a finite float > 0; got -1.0"):
            heat_rerank(q, db, ranks, k=5, lam=-1.0, variant="hewr")
        with pytest.raises(ValueError, match=r"heat_rerank\(\): k must be >= 1; got 0"):
            heat_rerank(q, db, ranks, k=0, lam=1.0)
        with pytest.raises(ValueError, match=r"heat_rerank\(\): variant must be one of \('paper', 'hewr'\); got 'm'"):
            heat_rerank(q, db, ranks, k=5, lam=1.0, variant="m")
        with pytest.raises(ShapeError, match=r"heat_rerank\(\): q must have shape \(Q, D\); got \(4\) with 1 dims"):
            heat_rerank(q[0], db, ranks, k=5, lam=1.0)
        with pytest.raises(ShapeError, match=r"heat_rerank\(\): db must have shape \(N, D\); got \(1, 10, 4\)"):
            heat_rerank(q, db[None], ranks, k=5, lam=1.0)
        with pytest.raises(ShapeError, match=r"heat_rerank\(\): db must have shape \(N, D\) with D=4; got \(10, 3\)"):
            heat_rerank(q, db[:, :3], ranks, k=5, lam=1.0)
        with pytest.raises(ShapeError, match=r"heat_rerank\(\): ranks must have shape \(Q, K\); got \(10\)"):
            heat_rerank(q, db, ranks[0], k=5, lam=1.0)
        with pytest.raises(
            ShapeError, match=r"heat_rerank\(\): ranks must have shape \(Q, K\) with Q=2; got \(1, 10\)"
        ):
            heat_rerank(q, db, ranks[:1], k=5, lam=1.0)
        with pytest.raises(DTypeError, match=r"heat_rerank\(\): ranks must have dtype in \[torch.int64\]"):
            heat_rerank(q, db, ranks.float(), k=5, lam=1.0)
        with pytest.raises(ValueError, match=r"HeR\(\): k must be an int >= 1; got 0"):
            deepagg.HeR(k=0)
        with pytest.raises(ValueError, match=r"HeR\(\): lam must be a finite float > 0; got 0.0"):
            deepagg.HeR(lam=0.0)
        with pytest.raises(ValueError, match=r"HeR\(\): variant must be one of \('paper', 'hewr'\); got 'm'"):
            deepagg.HeR(variant="m")


# --------------------------------------------------------------------------------------------------------------
# Regression: every solver path after torch.set_num_threads (MKL's batched LU is wrong there; Cholesky is not).
# --------------------------------------------------------------------------------------------------------------


def _with_threads(n: int, fn: Callable[[], None]) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        fn()
    finally:
        torch.set_num_threads(old)


class TestThreadsRegression(BaseTester):
    def test_set_num_threads_large(self) -> None:
        def body() -> None:
            x = relu_maps(2, 8, 16, 16, seed=30)  # n = 256 > C
            mask = torch.ones(2, 16, 16, dtype=torch.bool)
            mask[1, 14:] = False
            center = x.mean((0, 2, 3))
            refs = {
                "paper": ref_weights(x, "paper", 0.5, mask),
                "hewr": ref_weights(x, "hewr", 0.5, mask, center=center, affinity_threshold=None),
            }
            for variant, method in VARIANT_METHODS:
                got = hew_weights(x, lam=0.5, variant=variant, method=method, mask=mask, **_kw(variant, center))
                self.assert_close(got, refs[variant], rtol=1e-5, atol=1e-12)
            q, db, ranks = retrieval_setup(2, 300, 16, seed=31)
            for variant in ("paper", "hewr"):
                _, rewards = ref_rerank(q, db, ranks, 256, 0.5, variant)
                got_r = heat_rerank(q, db, ranks, k=256, lam=0.5, variant=variant)
                assert_rerank(got_r, ranks, 256, rewards, exact=min_gap(rewards) > 1e-9)

        _with_threads(2, body)
