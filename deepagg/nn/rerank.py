"""The one re-ranker interface: every re-ranker maps a :class:`RerankState` to a new one.

A re-ranker (query expansion, DBA, HeR, and later diffusion and DSM) is an ``nn.Module`` with its own natural
``forward`` plus ``rerank(state) -> state``. The state carries the query and database descriptors, the current
rankings and, by name, the extra inputs some re-rankers need (regional vectors, local features, a k-NN graph):
a re-ranker lists those names in ``requires``, and the caller (the evaluation app) provides them. Stages
compose with :class:`RerankChain` (e.g. AQE then HeR), each seeing the state the previous one left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from deepagg._checks import check_shape

__all__ = ["RerankChain", "RerankState", "Reranker", "rank_by_similarity"]


def rank_by_similarity(q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """Rankings :math:`(Q, N)` int64 by decreasing ``q @ db.T``, ties to the lower database index."""
    check_shape(q, "Q,D", name="q", fn="rank_by_similarity")
    check_shape(db, "N,D", name="db", fn="rank_by_similarity", sizes={"D": q.shape[1]})
    return torch.argsort(q @ db.mT, dim=1, descending=True, stable=True)


@dataclasses.dataclass(frozen=True)
class RerankState:
    """What re-rankers read and return.

    Attributes:
        q: Query descriptors :math:`(Q, D)`, unit rows (query expansion replaces them).
        db: Database descriptors :math:`(N, D)`, unit rows (DBA replaces them).
        ranks: Current rankings :math:`(Q, N)` int64, best first.
        extras: Named extra inputs (e.g. ``"db_regions"``), those listed in the re-rankers' ``requires``.
    """

    q: torch.Tensor
    db: torch.Tensor
    ranks: torch.Tensor
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def initial(cls, q: torch.Tensor, db: torch.Tensor, **extras: Any) -> RerankState:
        """The state before any re-ranking: rankings by cosine similarity."""
        return cls(q=q, db=db, ranks=rank_by_similarity(q, db), extras=extras)

    def replace(self, **changes: Any) -> RerankState:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class Reranker(nn.Module):
    """Base class of re-rankers: implement :meth:`rerank` (and list extra inputs in ``requires``)."""

    #: Names of the ``RerankState.extras`` this re-ranker reads.
    requires: tuple[str, ...] = ()

    def rerank(self, state: RerankState) -> RerankState:
        """Return the state after this re-ranker (new rankings, and possibly new descriptors)."""
        raise NotImplementedError(f"{type(self).__name__} must implement rerank(state).")


class RerankChain(Reranker):
    """Re-rankers applied in order, each on the state the previous one returned (e.g. AQE then HeR).

    Args:
        stages: The re-rankers, in order (at least one).

    Raises:
        ValueError: If ``stages`` is empty or holds something that is not a :class:`Reranker`.

    Example:
        >>> from deepagg import QueryExpansion, HeR
        >>> from deepagg.functional import l2n
        >>> chain = RerankChain([QueryExpansion(k=10), HeR(k=800)])
        >>> state = RerankState.initial(l2n(torch.randn(3, 16)), l2n(torch.randn(50, 16)))
        >>> chain.rerank(state).ranks.shape
        torch.Size([3, 50])
    """

    def __init__(self, stages: Iterable[Reranker]) -> None:
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("RerankChain(): stages must hold at least one re-ranker; got none.")
        for i, s in enumerate(stages):
            if not isinstance(s, Reranker):
                raise ValueError(f"RerankChain(): stages[{i}] must be a Reranker; got {type(s).__name__}.")
        self.stages = nn.ModuleList(stages)
        self.requires = tuple(dict.fromkeys(name for s in stages for name in s.requires))

    def rerank(self, state: RerankState) -> RerankState:
        """Apply every stage in order."""
        for stage in self.stages:
            state = stage.rerank(state)  # type: ignore[operator]
        return state

    def forward(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """Rankings :math:`(Q, N)` after every stage, starting from cosine similarity."""
        return self.rerank(RerankState.initial(q, db)).ranks
