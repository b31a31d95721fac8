r"""Diffusion re-ranking (global and regional) as a :class:`deepagg.Reranker`.

Iscen et al., CVPR 2017 (``regional-diffusion-cg.txt``); the maths is in :mod:`deepagg.functional.diffusion`.
:class:`Diffusion` keeps the offline part (the mutual k-NN graph of the database nodes, its prepared CG operator,
the GMP pooling weights) and answers queries in batches: seeds by eq. 7/8, one batched CG solve, regional
scores pooled per image (eq. 13/14), new rankings.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from deepagg._checks import ShapeError, check_dtype, check_floating, check_shape
from deepagg._io import atomic_write
from deepagg.functional.diffusion import (
    BACKENDS,
    FAISS_INDEXES,
    SEED_VARIANTS,
    DiffusionOperator,
    _check_float,
    diffusion_scores,
    gmp_weights,
    mutual_knn_affinity,
    query_seeds,
)
from deepagg.functional.embedding import fit_gmm
from deepagg.nn.rerank import Reranker, RerankState

__all__ = ["Diffusion"]

log = logging.getLogger(__name__)

POOLINGS = ("gmp", "sum")
MODES = ("inductive", "transductive")
#: Extras a regional :class:`Diffusion` reads from the :class:`RerankState`.
REGIONAL_EXTRAS = ("db_regions", "db_region_mask", "q_regions", "q_region_mask")


def _int_or_none(value: Any, name: str, cls: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}(): {name} must be an int >= {minimum} or None; got {value!r}.")
    return int(value)


def _choice(value: Any, name: str, cls: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{cls}(): {name} must be one of {options}; got {value!r}.")
    return str(value)


def fingerprint(nodes: torch.Tensor) -> str:
    """sha256 of node descriptors (shape and float32 bytes): which descriptors a graph was built for."""
    data = nodes.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{tuple(data.shape)}".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


class Diffusion(Reranker):
    r"""Diffusion re-ranking on a mutual k-NN graph (Iscen et al., CVPR 2017), global or regional.

    **Offline** (:meth:`fit`, or the first :meth:`rerank`): the graph nodes are the database descriptors
    (global) or the valid R-MAC region vectors of every database image (``regional=True``, about 21 per image;
    optionally reduced to ``reduce_regions`` unit GMM means per image, section 4.4). The mutual k-NN graph
    (:func:`deepagg.functional.mutual_knn_affinity`) and its prepared operator are built once; with
    ``cache_dir`` the graph is saved there (atomically) under the sha256 of the nodes and the graph options and
    reused by later runs. A graph is tied to its descriptors: re-ranking another database is an error.

    **Online** (inductive, the paper's method, the default): each query's seed vector by eq. 7 (its kq nearest
    nodes; regional: eq. 8 over the query's regions), one batched CG solve for all queries, and for regional
    diffusion the region scores pooled per image with GMP weights (eq. 14, ``pooling="gmp"``) or summed
    (``pooling="sum"``, the ablation). Explicit seeds (e.g. spatially verified images) go through
    ``scores(..., seeds=y)``. ``truncate=T`` solves each query on the sub-graph of its top T images by global
    similarity (the paper's early truncation, the normalisation rebuilt on the sub-graph; the seeds are
    computed over the whole database and restricted to the sub-graph, where the authors' code searches the
    sub-graph only). ``mode="transductive"`` is the other, clearly different method: the queries are inserted
    into the graph (rebuilt per call, never cached) and seeded with 1.

    New rankings sort images by decreasing score; images with equal scores (e.g. 0: not reached, or outside
    the truncation shortlist) keep their order in the incoming ranking.

    Args:
        regional: Nodes are regions (needs the extras ``db_regions``/``db_region_mask``/``q_regions``/
            ``q_region_mask``) instead of global descriptors.
        k: Graph neighbours (default 50 global, 200 regional; 50 with ``reduce_regions``).
        kq: Query neighbours and kept seed entries (default 10 global, 200 regional).
        gamma: Kernel exponent (3).
        alpha: Diffusion parameter in (0, 1) (0.99).
        max_iter: CG iterations (20).
        tol: CG relative tolerance (1e-6).
        pooling: Regional score pooling, ``"gmp"`` or ``"sum"``.
        gmp_lam: GMP regulariser lambda (1).
        truncate: Shortlist size T (images) for early truncation, or None.
        reduce_regions: Unit GMM means per image instead of the regions (5 in the paper), or None.
        mode: ``"inductive"`` or ``"transductive"``.
        variant: ``"paper"`` or ``"iscen"`` (the authors' released code: k-NN lists that count the node itself,
            so k - 1 neighbours, and seeds from summed raw similarities; see :func:`query_seeds`).
        backend: k-NN backend, ``"torch"`` (exact) or ``"faiss"``; ``index``: ``"flat"``, ``"ivf"``, ``"hnsw"``.
        index: faiss index type.
        cache_dir: Folder for the graph cache, or None.

    Raises:
        ValueError: If an option is out of range or unknown.

    Example:
        >>> from deepagg.functional import l2n
        >>> db, q = l2n(torch.randn(60, 8)), l2n(torch.randn(3, 8))
        >>> Diffusion(k=5, kq=3)(q, db).shape
        torch.Size([3, 60])
    """

    def __init__(
        self,
        *,
        regional: bool = False,
        k: int | None = None,
        kq: int | None = None,
        gamma: float = 3.0,
        alpha: float = 0.99,
        max_iter: int = 20,
        tol: float = 1e-6,
        pooling: str = "gmp",
        gmp_lam: float = 1.0,
        truncate: int | None = None,
        reduce_regions: int | None = None,
        mode: str = "inductive",
        variant: str = "paper",
        backend: str = "torch",
        index: str = "flat",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        cls = "Diffusion"
        if not isinstance(regional, bool):
            raise ValueError(f"{cls}(): regional must be a bool; got {regional!r}.")
        self.regional = regional
        self.reduce_regions = _int_or_none(reduce_regions, "reduce_regions", cls, 1)
        if self.reduce_regions is not None and not regional:
            raise ValueError(f"{cls}(): reduce_regions applies to regional diffusion; set regional=True.")
        default_k = (50 if self.reduce_regions else 200) if regional else 50
        self.k = _int_or_none(k, "k", cls, 1) or default_k
        self.kq = _int_or_none(kq, "kq", cls, 1) or (200 if regional else 10)
        self.gamma = _check_float(gamma, "gamma", cls, low=0.0)
        self.alpha = _check_float(alpha, "alpha", cls, low=0.0, high=1.0)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"{cls}(): max_iter must be an int >= 0; got {max_iter!r}.")
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise ValueError(f"{cls}(): tol must be a finite float >= 0; got {tol!r}.")
        self.pooling = _choice(pooling, "pooling", cls, POOLINGS)
        self.gmp_lam = _check_float(gmp_lam, "gmp_lam", cls, low=0.0)
        self.truncate = _int_or_none(truncate, "truncate", cls, 1)
        self.mode = _choice(mode, "mode", cls, MODES)
        self.variant = _choice(variant, "variant", cls, SEED_VARIANTS)
        self.backend = _choice(backend, "backend", cls, BACKENDS)
        self.index = _choice(index, "index", cls, FAISS_INDEXES)
        if self.backend == "torch" and self.index != "flat":
            raise ValueError(f"{cls}(): index={index!r} needs backend='faiss' (the torch backend is exact).")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.requires = REGIONAL_EXTRAS if regional else ()
        self._fitted: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- offline

    @property
    def graph_k(self) -> int:
        """Neighbours per node in the graph's k-NN lists (the authors' lists count the node itself)."""
        return self.k - 1 if self.variant == "iscen" else self.k

    def _nodes(
        self, db: torch.Tensor, regions: torch.Tensor | None, region_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(nodes (M, D), node_image (M,), node_weight (M,))`` of a database."""
        fn = "Diffusion.fit"
        n = db.shape[0]
        if not self.regional:
            return db, torch.arange(n, device=db.device), torch.ones(n, dtype=db.dtype, device=db.device)
        if regions is None or region_mask is None:
            raise ValueError(
                f"{fn}(): regional diffusion needs the database regions (N, R, D) and their mask (N, R); got none."
            )
        check_shape(regions, "N,R,D", name="regions", fn=fn, sizes={"N": n})
        check_floating(regions, name="regions", fn=fn)
        check_shape(region_mask, "N,R", name="region_mask", fn=fn, sizes={"N": n, "R": regions.shape[1]})
        check_dtype(region_mask, (torch.bool,), name="region_mask", fn=fn)
        if self.reduce_regions is not None:
            regions, region_mask = self._reduce(regions, region_mask)
        if self.pooling == "gmp":
            weights = gmp_weights(regions, region_mask, lam=self.gmp_lam)
        else:
            weights = region_mask.to(regions.dtype)
        img = torch.arange(n, device=regions.device)[:, None].expand_as(region_mask)
        return regions[region_mask], img[region_mask], weights[region_mask]

    def _reduce(self, regions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit means of a per-image GMM with ``reduce_regions`` components (images with fewer regions keep them)."""
        m = int(self.reduce_regions or 0)
        n, _, d = regions.shape
        out = regions.new_zeros(n, m, d)
        out_mask = torch.zeros(n, m, dtype=torch.bool, device=regions.device)
        gen = torch.Generator().manual_seed(0)
        for i in range(n):
            v = regions[i][mask[i]]
            if v.shape[0] <= m:
                out[i, : v.shape[0]] = v
                out_mask[i, : v.shape[0]] = True
                continue
            means, _, _ = fit_gmm(v, m, generator=gen)
            out[i] = torch.nn.functional.normalize(means, dim=1)
            out_mask[i] = True
        return out, out_mask

    def _graph_file(self, fp: str) -> Path | None:
        if self.cache_dir is None:
            return None
        opts = f"k{self.graph_k}-g{self.gamma:g}-{self.backend}-{self.index}"
        return self.cache_dir / f"{fp[:32]}-{opts}.pt"

    def _graph(self, nodes: torch.Tensor, fp: str) -> torch.Tensor:
        m = nodes.shape[0]
        if self.graph_k >= m:
            raise ValueError(
                f"Diffusion.fit(): k must be < the number of graph nodes {m} (each node's neighbours exclude "
                f"itself); got k = {self.k}{' (k - 1 neighbours in variant iscen)' if self.variant == 'iscen' else ''}."
            )
        path = self._graph_file(fp)
        if path is not None and path.exists():
            try:
                saved = torch.load(path, map_location=nodes.device, weights_only=True)
                if saved["fingerprint"] == fp:
                    log.info("diffusion graph loaded from %s", path)
                    return torch.sparse_coo_tensor(
                        saved["indices"], saved["values"], (m, m), is_coalesced=True, check_invariants=False
                    )
            except (OSError, RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as err:
                log.warning("diffusion graph cache %s unreadable (%s); rebuilding it", path, err)
        a = mutual_knn_affinity(nodes, k=self.graph_k, gamma=self.gamma, backend=self.backend, index=self.index)
        if path is not None:
            buf = io.BytesIO()
            torch.save({"fingerprint": fp, "indices": a.indices().cpu(), "values": a.values().cpu()}, buf)
            with atomic_write(path, "wb", fsync=True) as fh:
                fh.write(buf.getvalue())
            log.info("diffusion graph saved to %s", path)
        return a

    def fit(
        self,
        db: torch.Tensor,
        regions: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
    ) -> Diffusion:
        """Build (or load from ``cache_dir``) the graph of the database; returns self.

        Args:
            db: Database descriptors :math:`(N, D)`, unit rows.
            regions: Regional only: region vectors :math:`(N, R, D)`, unit rows.
            region_mask: Regional only: bool :math:`(N, R)`, True = valid region.

        Raises:
            ValueError: If k is not below the number of nodes, or regional inputs are missing.
        """
        check_shape(db, "N,D", name="db", fn="Diffusion.fit")
        check_floating(db, name="db", fn="Diffusion.fit")
        nodes, node_image, node_weight = self._nodes(db, regions, region_mask)
        fitted: dict[str, Any] = {
            "db": db,
            "db_fingerprint": fingerprint(db),
            "n_images": db.shape[0],
            "nodes": nodes,
            "node_image": node_image,
            "node_weight": node_weight,
        }
        if self.mode == "inductive":
            graph = self._graph(nodes, fitted["db_fingerprint"] if not self.regional else fingerprint(nodes))
            fitted["graph"] = graph
            fitted["operator"] = DiffusionOperator(graph, alpha=self.alpha) if self.truncate is None else None
        self._fitted = fitted
        return self

    @property
    def graph(self) -> torch.Tensor | None:
        """The fitted sparse affinity matrix (None before :meth:`fit`, and in transductive mode)."""
        return None if self._fitted is None else self._fitted.get("graph")

    # ------------------------------------------------------------------------------------------------ online

    def scores(
        self,
        q: torch.Tensor,
        *,
        q_regions: torch.Tensor | None = None,
        q_region_mask: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        shortlist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image scores :math:`(Q, N)` of the fitted database for queries ``q`` :math:`(Q, D)`.

        Args:
            q: Query descriptors :math:`(Q, D)` (global; for truncation and the transductive mode).
            q_regions: Regional: query region vectors :math:`(Q, R, D)`.
            q_region_mask: Regional: bool :math:`(Q, R)`.
            seeds: Explicit seeds :math:`(M, Q)` over the graph nodes instead of eq. 7/8.
            shortlist: With ``truncate``: the images :math:`(Q, T')` to keep per query (default: the top
                ``truncate`` by ``q @ db.T``).

        Raises:
            RuntimeError: If called before :meth:`fit`.
            ShapeError: If ``seeds`` does not have one row per graph node.
        """
        if self._fitted is None:
            raise RuntimeError("Diffusion.scores(): call fit(db, ...) first (or use rerank(state), which fits).")
        fit = self._fitted
        nodes: torch.Tensor = fit["nodes"]
        m, nq = nodes.shape[0], q.shape[0]
        if self.regional:
            if q_regions is None or q_region_mask is None:
                raise ValueError("Diffusion.scores(): regional diffusion needs q_regions and q_region_mask.")
            q_nodes, q_mask = q_regions, q_region_mask
        else:
            q_nodes, q_mask = q, None
        if self.mode == "transductive":
            f = self._transductive(q_nodes, q_mask)
        else:
            y = self.seeds(q_nodes, q_mask) if seeds is None else self._check_seeds(seeds, m, nq)
            if self.truncate is None:
                f, _ = fit["operator"].solve(y, max_iter=self.max_iter, tol=self.tol)
            else:
                f = self._truncated(q, y, shortlist)
        return self.pool(f)

    def _check_seeds(self, seeds: torch.Tensor, m: int, nq: int) -> torch.Tensor:
        if seeds.ndim != 2 or seeds.shape != (m, nq):
            raise ShapeError(
                f"Diffusion.scores(): seeds must have shape (M, Q) = ({m}, {nq}) (one row per graph node, one column "
                f"per query); got {tuple(seeds.shape)}."
            )
        return seeds.to(self._fitted["nodes"].dtype)  # type: ignore[index]

    def seeds(self, q_nodes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Seeds :math:`(M, Q)`: eq. 7 (``q_nodes`` :math:`(Q, D)`) or eq. 8 (regions :math:`(Q, R, D)` + ``mask``)."""
        if self._fitted is None:
            raise RuntimeError("Diffusion.seeds(): call fit(db, ...) first.")
        nodes: torch.Tensor = self._fitted["nodes"]
        kq = min(self.kq, nodes.shape[0])
        return query_seeds(q_nodes, nodes, k=kq, gamma=self.gamma, mask=mask, variant=self.variant)

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        """Image scores :math:`(Q, N)` from node scores :math:`(M, Q)`: identity (global) or eq. 13 (regional)."""
        if self._fitted is None:
            raise RuntimeError("Diffusion.pool(): call fit(db, ...) first.")
        fit = self._fitted
        node_image: torch.Tensor = fit["node_image"]
        w: torch.Tensor = fit["node_weight"].to(f.dtype)
        out = torch.zeros(fit["n_images"], f.shape[1], dtype=f.dtype, device=f.device)
        out.index_add_(0, node_image, f * w[:, None])
        return out.T

    @property
    def operator(self) -> DiffusionOperator | None:
        """The prepared CG operator of the fitted graph (None before :meth:`fit`, with truncation, transductive)."""
        return None if self._fitted is None else self._fitted.get("operator")

    def _truncated(self, q: torch.Tensor, y: torch.Tensor, shortlist: torch.Tensor | None) -> torch.Tensor:
        fit = self._fitted
        assert fit is not None
        db_global: torch.Tensor = fit["db"]
        if shortlist is None:
            t = min(int(self.truncate or 0), db_global.shape[0])
            shortlist = torch.topk(q @ db_global.mT, t, dim=1).indices
        node_image: torch.Tensor = fit["node_image"]
        n_img = fit["n_images"]
        # Nodes of each query's shortlisted images, -1 padded: a (Q, n_img) membership, then its node rows.
        member = torch.zeros(q.shape[0], n_img, dtype=torch.bool, device=q.device)
        member.scatter_(1, shortlist, True)
        node_in = member[:, node_image]  # (Q, M)
        counts = node_in.sum(1)
        width = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~node_in).to(torch.int8), dim=1, stable=True)[:, :width]
        nodes = torch.where(torch.arange(width, device=q.device)[None] < counts[:, None], order, -1)
        f = diffusion_scores(fit["graph"], y, alpha=self.alpha, max_iter=self.max_iter, tol=self.tol, nodes=nodes)
        assert isinstance(f, torch.Tensor)
        return f

    def _transductive(self, q_nodes: torch.Tensor, q_mask: torch.Tensor | None) -> torch.Tensor:
        """Queries inserted into the graph (rebuilt for this call), each seeded with 1 on its own nodes."""
        fit = self._fitted
        assert fit is not None
        nodes: torch.Tensor = fit["nodes"]
        m = nodes.shape[0]
        flat = q_nodes.reshape(-1, q_nodes.shape[-1]).to(nodes.dtype)
        per_q = 1 if q_nodes.ndim == 2 else q_nodes.shape[1]
        dev = nodes.device
        valid = torch.ones(flat.shape[0], dtype=torch.bool, device=dev) if q_mask is None else q_mask.reshape(-1)
        flat = flat[valid]
        owner = torch.arange(q_nodes.shape[0], device=dev).repeat_interleave(per_q)[valid]
        allx = torch.cat([nodes, flat])
        if self.graph_k >= allx.shape[0]:
            raise ValueError(f"Diffusion: k must be < the number of graph nodes {allx.shape[0]}; got k = {self.k}.")
        a = mutual_knn_affinity(allx, k=self.graph_k, gamma=self.gamma, backend=self.backend, index=self.index)
        y = torch.zeros(allx.shape[0], q_nodes.shape[0], dtype=nodes.dtype, device=dev)
        y[m + torch.arange(flat.shape[0], device=dev), owner] = 1.0
        f = diffusion_scores(a, y, alpha=self.alpha, max_iter=self.max_iter, tol=self.tol)
        assert isinstance(f, torch.Tensor)
        return f[:m]

    def forward(
        self,
        q: torch.Tensor,
        db: torch.Tensor,
        *,
        q_regions: torch.Tensor | None = None,
        q_region_mask: torch.Tensor | None = None,
        db_regions: torch.Tensor | None = None,
        db_region_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image scores :math:`(Q, N)`, fitting the graph on ``db`` first if it is not fitted (else checking it)."""
        self._ensure_fitted(db, db_regions, db_region_mask)
        return self.scores(q, q_regions=q_regions, q_region_mask=q_region_mask)

    def _ensure_fitted(self, db: torch.Tensor, regions: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        """Fit on ``db`` if nothing is fitted; else refuse a database other than the fitted one."""
        if self._fitted is None:
            self.fit(db, regions, mask)
            return
        fp = self._fitted["db_fingerprint"]
        if tuple(db.shape) != tuple(self._fitted["db"].shape) or fingerprint(db) != fp:
            raise ValueError(
                f"Diffusion: the graph was built for other descriptors ({self._fitted['n_images']} database rows, "
                f"sha256 {fp[:12]}); got {db.shape[0]} rows that differ. Call fit(db, ...) for this database, or "
                "use a new Diffusion."
            )

    def rerank(self, state: RerankState) -> RerankState:
        """The re-ranker interface: rankings by diffusion score, ties in the incoming order."""
        ex = state.extras
        regions = ex.get("db_regions") if self.regional else None
        mask = ex.get("db_region_mask") if self.regional else None
        self._ensure_fitted(state.db, regions, mask)
        s = self.scores(
            state.q,
            q_regions=ex.get("q_regions") if self.regional else None,
            q_region_mask=ex.get("q_region_mask") if self.regional else None,
            seeds=ex.get("diffusion_seeds"),
        )
        ranks = state.ranks
        if ranks.shape[1] < s.shape[1]:  # a truncated incoming ranking: the unlisted images follow, in index order
            listed = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ranks, True)
            rest = torch.argsort(listed.to(torch.int8), dim=1, stable=True)[:, : s.shape[1] - ranks.shape[1]]
            ranks = torch.cat([ranks, rest], dim=1)
        order = torch.argsort(s.gather(1, ranks), dim=1, descending=True, stable=True)
        return state.replace(ranks=ranks.gather(1, order))

    def extra_repr(self) -> str:
        parts = [f"regional={self.regional}", f"k={self.k}", f"kq={self.kq}", f"gamma={self.gamma:g}"]
        parts += [f"alpha={self.alpha:g}", f"max_iter={self.max_iter}", f"tol={self.tol:g}"]
        if self.regional:
            parts.append(f"pooling={self.pooling!r}")
            if self.reduce_regions is not None:
                parts.append(f"reduce_regions={self.reduce_regions}")
        if self.truncate is not None:
            parts.append(f"truncate={self.truncate}")
        if self.mode != "inductive":
            parts.append(f"mode={self.mode!r}")
        if self.variant != "paper":
            parts.append(f"variant={self.variant!r}")
        if self.backend != "torch":
            parts.append(f"backend={self.backend!r}, index={self.index!r}")
        return ", ".join(parts)
