"""``RevisitedMAP``: the revisitop protocol (:mod:`deepagg.metrics`) as a DDP-safe torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from deepagg.metrics import compute_map, evaluate_revisited

__all__ = ["RevisitedMAP"]


class RevisitedMAP(Metric):
    """Revisited Oxford/Paris mAP and mP@k (Easy/Medium/Hard), or old-protocol mAP, over a DDP world.

    ``update(ranks, query_idx)`` takes the rankings of some queries (each process may hold any subset, in any
    order); ``compute()`` gathers the list states from every process (``dist_reduce_fx=None`` +
    ``dim_zero_cat``), puts the rows back in query order, checks every query was seen exactly once, and
    evaluates with :func:`deepagg.metrics.evaluate_revisited` (``gnd`` with ``easy``/``hard``/``junk``) or
    :func:`deepagg.metrics.compute_map` (``ok``/``junk``). Unlike torchmetrics' ``RetrievalMAP`` this is
    revisitop's trapezoidal AP with junk removed and queries without positives skipped.

    Args:
        gnd: The ground truth, one dict per query.
        kappas: The k of mP@k.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> gnd = [{"easy": np.array([0]), "hard": np.array([2]), "junk": np.array([1])}]
        >>> metric = RevisitedMAP(gnd, kappas=(1,))
        >>> metric.update(torch.tensor([[0, 1, 3, 2]]), torch.tensor([0]))
        >>> round(metric.compute()["medium"]["map"], 4)
        0.8333
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    ranks: list[torch.Tensor]
    query_idx: list[torch.Tensor]

    def __init__(self, gnd: list[dict[str, Any]], kappas: tuple[int, ...] = (1, 5, 10), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gnd = list(gnd)
        self.kappas = tuple(int(k) for k in kappas)
        self.revisited = bool(self.gnd) and all("easy" in g for g in self.gnd)
        self.add_state("ranks", default=[], dist_reduce_fx=None)
        self.add_state("query_idx", default=[], dist_reduce_fx=None)

    def update(self, ranks: torch.Tensor, query_idx: torch.Tensor) -> None:
        """Add the rankings ``(Q, K)`` (best first) of the queries ``query_idx (Q,)``."""
        if ranks.ndim != 2 or query_idx.ndim != 1 or ranks.shape[0] != query_idx.shape[0]:
            raise ValueError(
                f"RevisitedMAP.update(): ranks must be (Q, K) and query_idx (Q,); got {tuple(ranks.shape)} and "
                f"{tuple(query_idx.shape)}."
            )
        self.ranks.append(ranks.long())
        self.query_idx.append(query_idx.long())

    def compute(self) -> dict[str, Any]:
        """Evaluate every query once; returns ``{"easy"|"medium"|"hard": {...}}`` or ``{"map", ...}`` (old)."""
        ranks = dim_zero_cat(self.ranks).cpu().numpy()
        idx = dim_zero_cat(self.query_idx).cpu().numpy()
        order = np.argsort(idx, kind="stable")
        idx, ranks = idx[order], ranks[order]
        # A DistributedSampler pads the last shard by repeating samples: keep the first copy of each query.
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        idx, ranks = idx[keep], ranks[keep]
        if len(idx) != len(self.gnd) or not np.array_equal(idx, np.arange(len(self.gnd))):
            missing = sorted(set(range(len(self.gnd))) - set(idx.tolist()))
            raise RuntimeError(
                f"RevisitedMAP.compute(): every query must be ranked once; {len(missing)} of {len(self.gnd)} "
                f"are missing (first: {missing[:5]})."
            )
        if self.revisited:
            return evaluate_revisited(ranks, self.gnd, kappas=self.kappas)
        m, aps, mpr, prs = compute_map(ranks, self.gnd, kappas=self.kappas)
        return {"map": m, "aps": aps, "mpr": mpr, "prs": prs}
