r"""Deep spatial matching (DSM) as a :class:`deepagg.Reranker`, with spatially verified diffusion.

Siméoni, Avrithis and Chum, CVPR 2019 (``deep-spatial-matching-dsm.txt``); the maths is in
:mod:`deepagg.functional.spatial`. :class:`DSM` detects local features on activation maps (:meth:`DSM.extract`,
database images once, offline; the maps are not needed afterwards), re-ranks each query's top ``top`` images by
the number of inliers of fast spatial matching (max over the scale pairs), and, with a ``diffusion`` stage, seeds
diffusion with the spatially verified images (section 3.6: the top ``verified`` re-ranked images scored by
inliers times similarity, the top ``seeds`` of them kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deepagg._checks import check_int, check_positive
from deepagg.functional.spatial import LocalFeatures, SpatialMatch, activation_features, spatial_match
from deepagg.nn.diffusion import Diffusion
from deepagg.nn.rerank import Reranker, RerankState

__all__ = ["DSM", "LOCAL_FEATURE_EXTRAS"]

#: Extras a :class:`DSM` reads from the :class:`RerankState`: the local features of queries and database images.
LOCAL_FEATURE_EXTRAS = ("q_local_features", "db_local_features")


def _features(obj: Any, name: str) -> LocalFeatures:
    """``obj`` as one batched :class:`LocalFeatures` (a list of per-image ones is concatenated)."""
    if isinstance(obj, LocalFeatures):
        return obj
    if isinstance(obj, (list, tuple)) and all(isinstance(o, LocalFeatures) for o in obj):
        if not obj:
            raise ValueError(f"DSM: {name} must hold at least one image's features; got an empty list.")
        return LocalFeatures.cat(obj)
    raise TypeError(f"DSM: {name} must be LocalFeatures (DSM.extract) or a list of them; got {type(obj).__name__}.")


class DSM(Reranker):
    """Deep spatial matching re-ranking of the top ``top`` images, optionally followed by verified diffusion.

    Args:
        top: Images re-ranked per query by inlier count (100); ties keep the incoming order.
        scales: Image scales of the local features (the paper's 1, 1/sqrt(2), 1/2). The app extracts the maps at
            these scales; :meth:`extract` takes one map per scale.
        max_features: Features per image over all scales (512 for VGG16).
        error: Inlier threshold in pixels of the database activation map (2).
        max_scale_change: Largest scale change of a hypothesis (3).
        lo_iters: Local-optimisation rounds (3).
        detector: Further :func:`~deepagg.functional.activation_features` settings (``delta``, ``min_diversity``,
            ...); ``scaling`` is ``"image"`` unless given (8-bit levels by the image's maximum: weak channels give
            few regions: on `clutter` a third of the features of per-channel levels, and the same ranking,
            docs/dsm.md); ``backend="torch"`` detects on the maps' device with the batched torch MSER (a GPU, no
            OpenCV) instead of OpenCV's.
        diffusion: A :class:`Diffusion` (global) seeded by the verified images: spatially verified diffusion. Its
            graph is built on the database descriptors like ``rerank=diffusion``'s.
        verified: Re-ranked images that may seed diffusion (10).
        seeds: Seeds kept per query (5; the authors' code keeps 4 through an off-by-one, this keeps 5).
        pairs_per_call: Pairs matched in one batched call (memory bound).

    ``rerank`` adds ``dsm_inliers`` :math:`(Q, top)` (inliers of the re-ranked images, in the new order) and
    ``dsm_ranks`` :math:`(Q, top)` (those images) to the state's extras, for plots and analysis.

    Example:
        >>> import torch
        >>> dsm = DSM(scales=(1.0,))
        >>> maps = torch.rand(3, 16, 20, 24) ** 8  # (B, C, H, W) sparse activations
        >>> db = dsm.extract(maps)
        >>> dsm.inliers(dsm.extract(maps[0], query=True), db).shape
        torch.Size([3])
    """

    requires = LOCAL_FEATURE_EXTRAS

    def __init__(
        self,
        top: int = 100,
        *,
        scales: Sequence[float] = (1.0, 2**-0.5, 0.5),
        max_features: int = 512,
        error: float = 2.0,
        max_scale_change: float = 3.0,
        lo_iters: int = 3,
        detector: dict[str, Any] | None = None,
        diffusion: Diffusion | None = None,
        verified: int = 10,
        seeds: int = 5,
        pairs_per_call: int = 1000,
    ) -> None:
        super().__init__()
        cls = "DSM"
        self.top = check_int(top, name="top", fn=cls, minimum=1)
        scales = tuple(float(s) for s in scales)
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"{cls}(): scales must be a non-empty list of positive numbers; got {list(scales)}.")
        self.scales = scales
        self.max_features = check_int(max_features, name="max_features", fn=cls, minimum=1)
        check_positive(error, name="error", fn=cls)
        if not max_scale_change >= 1:
            raise ValueError(f"{cls}(): max_scale_change must be >= 1; got {max_scale_change}.")
        self.error, self.max_scale_change = float(error), float(max_scale_change)
        self.lo_iters = check_int(lo_iters, name="lo_iters", fn=cls, minimum=0)
        self.detector = {"scaling": "image", **(detector or {})}
        bad = sorted(set(self.detector) & {"query", "max_features"})
        if bad:
            raise ValueError(f"{cls}(): detector must not set {bad} (DSM sets them); got detector={self.detector}.")
        if diffusion is not None and not isinstance(diffusion, Diffusion):
            raise TypeError(f"{cls}(): diffusion must be a deepagg.Diffusion or None; got {type(diffusion).__name__}.")
        if diffusion is not None and diffusion.regional:
            raise ValueError(f"{cls}(): diffusion must be global (regional=False); got a regional Diffusion.")
        self.diffusion = diffusion
        self.verified = check_int(verified, name="verified", fn=cls, minimum=1)
        self.seeds = check_int(seeds, name="seeds", fn=cls, minimum=1)
        self.pairs_per_call = check_int(pairs_per_call, name="pairs_per_call", fn=cls, minimum=1)
        #: ``{"inliers", "ranks"}`` :math:`(Q, top)` of the last :meth:`rerank` (also in the returned extras).
        self.last_verification: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------------------- features

    def extract(self, maps: torch.Tensor | Sequence[torch.Tensor], *, query: bool = False) -> LocalFeatures:
        """Local features of activation maps (:func:`~deepagg.functional.activation_features`, these settings).

        ``maps``: :math:`(C, H, W)` or :math:`(B, C, H, W)`, or a list of them, one per scale.
        """
        return activation_features(maps, query=query, max_features=self.max_features, **self.detector)

    def match(self, query: LocalFeatures, database: Any, *, return_matches: bool = False) -> SpatialMatch:
        """:func:`~deepagg.functional.spatial_match` of one query's features against every database image."""
        db = _features(database, "database")
        if len(query) != 1:
            raise ValueError(f"DSM.match(): query must hold one image's features; got {len(query)} images.")
        return spatial_match(
            query,
            db,
            error=self.error,
            max_scale_change=self.max_scale_change,
            lo_iters=self.lo_iters,
            return_matches=return_matches,
        )

    def inliers(self, query: LocalFeatures, database: Any) -> torch.Tensor:
        """Inlier counts :math:`(N,)` int64 of one query against ``N`` database images, max over scale pairs.

        ``database``: batched features or a list of per-image ones.
        """
        return self.match(query, database).inliers

    def forward(self, query: LocalFeatures, database: Any) -> torch.Tensor:
        """Same as :meth:`inliers`."""
        return self.inliers(query, database)

    # ----------------------------------------------------------------------------------------------- re-rank

    def verify(self, q_feats: LocalFeatures, db_feats: LocalFeatures, shortlist: torch.Tensor) -> torch.Tensor:
        """Inlier counts :math:`(Q, T)` of every query against its shortlisted images :math:`(Q, T)`."""
        nq, t = shortlist.shape
        dev = db_feats.centers.device
        qi = torch.arange(nq, device=dev)[:, None].expand(nq, t).reshape(-1)
        pairs = torch.stack([qi, shortlist.reshape(-1).to(dev)], 1)
        out = torch.zeros(nq * t, dtype=torch.int64, device=dev)
        for start in range(0, len(pairs), self.pairs_per_call):
            chunk = pairs[start : start + self.pairs_per_call]
            out[start : start + len(chunk)] = spatial_match(
                q_feats,
                db_feats,
                chunk,
                error=self.error,
                max_scale_change=self.max_scale_change,
                lo_iters=self.lo_iters,
            ).inliers
        return out.view(nq, t)

    def verified_seeds(
        self, q: torch.Tensor, db: torch.Tensor, ranks: torch.Tensor, inliers: torch.Tensor
    ) -> torch.Tensor:
        """Diffusion seeds :math:`(N, Q)` from the re-ranked images (section 3.6).

        Of each query's first ``verified`` re-ranked images (``ranks`` :math:`(Q, T)`, ``inliers`` in that order):
        ``y_i = max((inliers_i / max inliers) * sim(q, x_i), 0)``, the ``seeds`` largest kept (ties to the better
        rank), the rest 0. A query whose ``y`` is all 0 (no positive similarity) uses the normalised inliers
        alone (the authors' fallback), and one without any inlier the diffusion's own eq. 7 seeds.
        """
        v = min(self.verified, ranks.shape[1])
        top, inl = ranks[:, :v], inliers[:, :v].to(q.dtype)
        top_inl = inl.amax(1, keepdim=True)
        w = torch.where(top_inl > 0, inl / top_inl.clamp(min=1), torch.zeros_like(inl))
        sim = (q[:, None, :] * db[top]).sum(-1)
        y = (w * sim).clamp(min=0)
        y = torch.where((y > 0).any(1, keepdim=True), y, w)  # the authors' fallback: the inliers alone
        keep = min(self.seeds, v)
        order = torch.argsort(y, dim=1, descending=True, stable=True)[:, :keep]  # ties to the better rank
        kept = torch.zeros_like(y).scatter_(1, order, y.gather(1, order))
        seeds = torch.zeros(db.shape[0], q.shape[0], dtype=q.dtype, device=q.device)
        seeds.scatter_(0, top.T.contiguous(), kept.T.contiguous())
        no_inlier = ~(w > 0).any(1)
        if bool(no_inlier.any()):
            assert self.diffusion is not None
            fallback = self.diffusion.seeds(q[no_inlier])
            seeds[:, no_inlier] = fallback.to(seeds.dtype)
        return seeds

    def rerank(self, state: RerankState) -> RerankState:
        """Re-rank each query's top ``top`` by inliers (ties in the incoming order); then verified diffusion."""
        ex = state.extras
        missing = [n for n in self.requires if n not in ex]
        if missing:
            raise ValueError(f"DSM.rerank(): the state lacks the extras {missing} (local features of DSM.extract).")
        q_feats = _features(ex["q_local_features"], "q_local_features").to(state.q.device)
        db_feats = _features(ex["db_local_features"], "db_local_features").to(state.q.device)
        if len(q_feats) != state.q.shape[0] or len(db_feats) != state.db.shape[0]:
            raise ValueError(
                f"DSM.rerank(): local features for {len(q_feats)} queries and {len(db_feats)} database images; the "
                f"state has {state.q.shape[0]} and {state.db.shape[0]}."
            )
        t = min(self.top, state.ranks.shape[1])
        shortlist = state.ranks[:, :t]
        inl = self.verify(q_feats, db_feats, shortlist)
        order = torch.argsort(inl, dim=1, descending=True, stable=True)
        new_top, new_inl = shortlist.gather(1, order), inl.gather(1, order)
        ranks = torch.cat([new_top, state.ranks[:, t:]], 1)
        extras = {**ex, "dsm_inliers": new_inl, "dsm_ranks": new_top}
        self.last_verification = {"inliers": new_inl, "ranks": new_top}
        out = state.replace(ranks=ranks, extras=extras)
        if self.diffusion is None:
            return out
        self.diffusion._ensure_fitted(state.db, None, None)
        seeds = self.verified_seeds(state.q, state.db, new_top, new_inl)
        return self.diffusion.rerank(out.replace(extras={**extras, "diffusion_seeds": seeds})).replace(extras=extras)

    def extra_repr(self) -> str:
        parts = [f"top={self.top}", f"scales={list(self.scales)}", f"max_features={self.max_features}"]
        parts += [f"error={self.error:g}", f"max_scale_change={self.max_scale_change:g}", f"lo_iters={self.lo_iters}"]
        if self.detector:
            parts.append(f"detector={self.detector}")
        if self.diffusion is not None:
            parts += [f"verified={self.verified}", f"seeds={self.seeds}"]
        return ", ".join(parts)
