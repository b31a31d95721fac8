"""HeW weights and HeR re-ranking vs the authors' method (one dense inverse per image / per query).

``python -m benchmarks.bench_heat``. Rows:

- HeW weights, both variants, batch 8, C = 512, n = 3072 and 768, float32: deepagg's batched exact path
  (``auto``: Woodbury for "paper" at these shapes, Cholesky for "hewr") against the authors' computation, an
  explicit dense inverse of :math:`I - \\Lambda^{-1}P` per image (HeWR's ``get_potential_inv.m``), in the same
  process. The "paper" rows also print the GEMM roofline: the time of plain matmuls doing the multiply-adds of
  the textbook Woodbury path (:math:`Z^\\top Z` and :math:`Z G^{-1}`, 4nC^2 flops per image). deepagg's path
  computes the Gram by lower block rows and :math:`L^{-1} Z^\\top` by block forward substitution (2.25nC^2
  without autograd), so it can come in under 1.0x.
- "paper" forced onto the n x n Cholesky path, to show what the hewr threshold costs (it rules out Woodbury).
- "inverse diagonal": ``diag(K^-1)`` of SPD matrices (the grounded Laplacians of post-ReLU maps) by
  ``deepagg.functional._spd.inverse_diagonal`` (the blocked inverse Cholesky factor HeW's paths use) against
  torch's ``cholesky_inverse(cholesky(K)).diagonal()``, batch 8 at n = 512 (the C x C size of Woodbury) and one
  matrix at n = 3072.
- HeR, 70 queries, k = 800, D = 512, 5000 database vectors: deepagg's ``heat_rerank`` (both variants) against
  the authors' per-query loop (Gram of the centred set, dense inverse of the (k+1)-node grounded Laplacian).
- On CUDA (when present): HeW images/s at n = 768.
"""

from __future__ import annotations

import torch

from benchmarks.common import compare, median_iqr_ms
from deepagg.functional import l2n
from deepagg.functional._spd import inverse_diagonal
from deepagg.functional.heat import heat_rerank, hew_weights


def ref_hew_dense(x: torch.Tensor, lam: float, variant: str, center: torch.Tensor | None) -> torch.Tensor:
    """The authors' way: per image, one explicit dense inverse, then eq. 13 (or their potential)."""
    out = []
    for img in x:
        f = img.flatten(1).T
        if variant == "hewr" and center is not None:
            f = f - center
        u = torch.nn.functional.normalize(f, dim=1)
        p = u @ u.T
        p.fill_diagonal_(0)
        n = p.shape[0]
        if variant == "hewr":
            zero = img.flatten(1).sum(0) == 0
            p[zero[:, None] & zero[None, :]] = 0
            p[p < 0.1] = 0
            ground = lam * p[p > 0].mean()
        else:
            ground = torch.tensor(lam, dtype=p.dtype)
        a = p.sum(1) + ground
        inv = torch.linalg.inv(torch.eye(n, dtype=p.dtype) - p / a[:, None])
        diag = inv.diagonal().clone()
        if variant == "hewr":
            inv.fill_diagonal_(0)
            out.append(diag * (n + 1) / inv.sum(0))
        else:
            out.append(torch.where(f.norm(dim=1) > 0, diag / inv.sum(0), 0.0))  # zero vectors: weight 0
    return torch.stack(out).reshape(x.shape[0], x.shape[2], x.shape[3])


def _her_reward(q: torch.Tensor, db: torch.Tensor, top: torch.Tensor, lam: float, variant: str) -> torch.Tensor:
    """The authors' reward of one query's shortlist ``top``: dense inverse of the grounded Laplacian."""
    k = top.shape[0]
    x = torch.cat([db[top], q[None]])
    x = x - x.mean(0)
    if variant == "paper":
        x = torch.nn.functional.normalize(x, dim=1)
    a = x @ x.T
    a.fill_diagonal_(0)
    a.clamp_(min=0)
    ground = lam * a[a > 0].mean() if variant == "hewr" else torch.tensor(lam, dtype=a.dtype)
    lap = torch.eye(k + 1, dtype=a.dtype) - a / (a.sum(1) + ground)[:, None]
    return torch.linalg.inv(lap)[:k, k]


def ref_her_loop(q: torch.Tensor, db: torch.Tensor, ranks: torch.Tensor, k: int, lam: float, variant: str):
    """The authors' ``cast_rerank.m`` per query (with eq. 14's cosine set-up for "paper")."""
    out = ranks.clone()
    for i in range(q.shape[0]):
        top = ranks[i, :k]
        reward = _her_reward(q[i], db, top, lam, variant)
        out[i, :k] = top[torch.argsort(reward, descending=True, stable=True)]
    return out


def order_violation(q: torch.Tensor, db: torch.Tensor, new: torch.Tensor, k: int, lam: float, variant: str) -> float:
    """Tie-aware check of a re-ranking: the largest relative increase of the float64 reward along ``new``'s top k.

    0 when ``new`` is sorted by the exact rewards; near-equal rewards may swap in float32 at ~1e-6.
    """
    worst = 0.0
    for i in range(q.shape[0]):
        r = _her_reward(q[i].double(), db.double(), new[i, :k], lam, variant)
        worst = max(worst, float((r[1:] - r[:-1]).clamp(min=0).max() / r.abs().max()))
    return worst


def _maps(b: int, c: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Sparse non-negative maps like post-ReLU conv5 activations (about 70% zeros, a few zero vectors)."""
    x = torch.relu(torch.randn(b, c, h, w, generator=g) - 0.5)
    x[:, :, 0, :2] = 0
    return x


def _inverse_diagonal_row(b: int, n: int, quick: bool, g: torch.Generator) -> dict:
    """``diag(K^-1)``: deepagg's blocked inverse Cholesky factor against torch's Cholesky + ``cholesky_inverse``."""
    u = torch.nn.functional.normalize(_maps(b, 512, 1, n, g).flatten(2).mT, dim=-1)  # (b, n, 512) unit rows
    a = u @ u.mT
    a.diagonal(dim1=-2, dim2=-1).zero_()
    k = torch.diag_embed(a.sum(-1) + 1.0) - a  # grounded Laplacian, lam = 1
    # float64 via torch's own Cholesky (never a batched LU: environment.md's MKL bug hangs or fails it here)
    exact = torch.cholesky_inverse(torch.linalg.cholesky(k.double())).diagonal(dim1=-2, dim2=-1)
    diff = float(((inverse_diagonal(k).double() - exact).abs() / exact).max())
    return compare(
        "heat",
        "inverse diagonal (blocked inverse Cholesky factor)",
        f"B={b} n={n}",
        lambda: inverse_diagonal(k),
        lambda: torch.cholesky_inverse(torch.linalg.cholesky(k)).diagonal(dim1=-2, dim2=-1),
        diff,
        reference="torch cholesky_inverse(cholesky(K)).diagonal()",
        quick=quick,
        tol=1e-4,
    )


def run(quick: bool = False) -> list[dict]:
    """Time HeW (both variants, both sizes) and HeR against the authors' dense inverses; one row per case."""
    g = torch.Generator().manual_seed(0)
    rows = []
    b, c = (2, 32) if quick else (8, 512)
    for h, w in [(6, 8), (4, 4)] if quick else [(48, 64), (24, 32)]:
        n = h * w
        x = _maps(b, c, h, w, g)
        center = x.mean((0, 2, 3))
        for variant, lam, cen in [("paper", 1.0, None), ("hewr", 0.1, center)]:
            ours = hew_weights(x, lam=lam, variant=variant, center=cen)
            # Accuracy against the float64 dense formula (float32 inverses of either kind drift by ~1e-5 relative,
            # more on nearly isolated positions, where the weight is a ratio of small numbers). In "hewr" an
            # affinity within float32 rounding of the 0.1 threshold can fall on the other side of it than in
            # float64, which moves a few weights by up to ~1e-2 (the authors' float32 code has the same jumps).
            ref = ref_hew_dense(x.double(), lam, variant, None if cen is None else cen.double())
            fin = torch.isfinite(ref)  # the authors' code gives isolated positions an infinite weight
            diff = float(((ours.double() - ref).abs() / ref.abs().clamp(min=1e-12))[fin].max())
            row = compare(
                "heat",
                f"HeW weights {variant} (auto)",
                f"B={b} C={c} n={n}",
                lambda x=x, lam=lam, variant=variant, cen=cen: hew_weights(x, lam=lam, variant=variant, center=cen),
                lambda x=x, lam=lam, variant=variant, cen=cen: ref_hew_dense(x, lam, variant, cen),
                diff,
                reference="dense inverse per image (HeWR)",
                quick=quick,
                tol=1e-4 if variant == "paper" else 5e-2,
            )
            if variant == "paper":
                z = torch.randn(b, n, c, generator=g)
                ginv = torch.randn(b, c, c, generator=g)
                roof_ms, _ = median_iqr_ms(lambda z=z, ginv=ginv: (z.mT @ z, z @ ginv), quick)
                row["roofline_ms"] = roof_ms
                row["case"] += f"; GEMM roofline {roof_ms:.1f} ms = {row['ours_ms'] / roof_ms:.2f}x"
            rows.append(row)
        ours = hew_weights(x, lam=1.0, method="cholesky")
        ref = ref_hew_dense(x.double(), 1.0, "paper", None)
        rows.append(
            compare(
                "heat",
                "HeW weights paper (cholesky, as hewr must)",
                f"B={b} C={c} n={n}",
                lambda x=x: hew_weights(x, lam=1.0, method="cholesky"),
                lambda x=x: ref_hew_dense(x, 1.0, "paper", None),
                float(((ours.double() - ref).abs() / ref.abs().clamp(min=1e-12)).max()),
                reference="dense inverse per image (HeWR)",
                quick=quick,
                tol=1e-2,
            )
        )
    for nb, n in [(2, 24), (1, 48)] if quick else [(8, 512), (1, 3072)]:
        rows.append(_inverse_diagonal_row(nb, n, quick, g))
    nq, n_db, d, k = (5, 200, 32, 100) if quick else (70, 5000, 512, 800)
    q = l2n(torch.randn(nq, d, generator=g) + 0.3)
    db = l2n(torch.randn(n_db, d, generator=g) + 0.3)
    ranks = torch.argsort(q @ db.T, dim=1, descending=True, stable=True)
    for variant, lam in [("paper", 1.0), ("hewr", 0.1)]:
        ours = heat_rerank(q, db, ranks, k=k, lam=lam, variant=variant)
        row = compare(
            "heat",
            f"HeR {variant}",
            f"{nq} q, k={k}, D={d}, N={n_db}",
            lambda variant=variant, lam=lam: heat_rerank(q, db, ranks, k=k, lam=lam, variant=variant),
            lambda variant=variant, lam=lam: ref_her_loop(q, db, ranks, k, lam, variant),
            order_violation(q, db, ours, k, lam, variant),
            reference="dense inverse per query (HeWR cast_rerank.m)",
            quick=quick,
            tol=1e-4,
        )
        row["case"] += f"; {row['ours_ms'] / nq:.2f} ms/query"
        if variant == "paper":  # the CPU default solves one query at a time: against batched solves
            for chunk in (8, nq):
                ms, _ = median_iqr_ms(lambda chunk=chunk: heat_rerank(q, db, ranks, k=k, lam=1.0, chunk=chunk), quick)
                row["case"] += f"; chunk={chunk}: {ms / nq:.2f}"
        rows.append(row)
    if torch.cuda.is_available() and not quick:
        xg = _maps(64, 512, 24, 32, g).cuda()
        for variant, lam, cen in [("paper", 1.0, None), ("hewr", 0.1, xg.mean((0, 2, 3)))]:
            ms, iqr = median_iqr_ms(
                lambda variant=variant, lam=lam, cen=cen: (
                    hew_weights(xg, lam=lam, variant=variant, center=cen),
                    torch.cuda.synchronize(),
                ),
                quick,
            )
            name = torch.cuda.get_device_name()
            rows.append(
                {
                    "bench": "heat",
                    "case": f"HeW {variant} on {name}: {64 / ms * 1e3:.0f} images/s",
                    "shape": "B=64 C=512 n=768",
                    "ours_ms": ms,
                    "ours_iqr_ms": iqr,
                    "ref_ms": float("nan"),
                    "ref_iqr_ms": float("nan"),
                    "ratio": float("nan"),
                    "max_abs_diff": 0.0,
                    "reference": "none (throughput)",
                }
            )
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_rows

    print_rows(run())
