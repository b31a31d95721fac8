"""Query expansion and database-side augmentation modules (re-rankers; no parameters)."""

from __future__ import annotations

import torch

from deepagg.functional.qe import _check_alpha, _check_k, dba, query_expansion
from deepagg.nn.rerank import Reranker, RerankState, rank_by_similarity

__all__ = ["DBA", "QueryExpansion"]


def _validate(k: int, alpha: float, cls: str) -> tuple[int, float]:
    """Hyperparameter checks of the modules: ``ValueError`` naming the argument and its value."""
    try:
        return _check_k(k, cls), float(_check_alpha(alpha, cls))
    except TypeError as err:
        raise ValueError(str(err)) from None


class QueryExpansion(Reranker):
    r"""Average query expansion (``alpha = 0``) or alpha-QE (``alpha > 0``) of L2-normalised queries.

    Chum et al., ICCV 2007 (AQE); Radenović, Tolias and Chum, TPAMI 2018 (alpha-QE):
    :math:`q' = \mathrm{l2n}(q + \sum_{i \in N_k(q)} w_i x_i)` with :math:`w_i = 1` (AQE) or
    :math:`\max(q^\top x_i, 0)^\alpha`; ties to the lower index, k capped at the database size.
    See :func:`deepagg.functional.query_expansion`.

    Args:
        k: Number of database neighbours, an int >= 0 (0 = identity up to normalisation).
        alpha: Weight exponent >= 0 (0 = AQE; alpha-QE commonly uses 3).

    Raises:
        ValueError: If ``k`` is not an int >= 0 or ``alpha`` is not a finite number >= 0.

    Shape:
        - q: :math:`(Q, D)`, db: :math:`(N, D)`, both L2-normalised rows.
        - Output: :math:`(Q, D)`, L2-normalised, in the dtype of ``q``.

    Example:
        >>> from deepagg.functional import l2n
        >>> QueryExpansion(k=10, alpha=3.0)(l2n(torch.randn(5, 32)), l2n(torch.randn(100, 32))).shape
        torch.Size([5, 32])
    """

    def __init__(self, k: int = 10, alpha: float = 0.0) -> None:
        super().__init__()
        self.k, self.alpha = _validate(k, alpha, "QueryExpansion")

    def forward(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """Expand queries ``q`` :math:`(Q, D)` against database ``db`` :math:`(N, D)`."""
        return query_expansion(q, db, k=self.k, alpha=self.alpha)

    def rerank(self, state: RerankState) -> RerankState:
        """The re-ranker interface: expanded queries, ranked again by cosine similarity."""
        q = self(state.q, state.db)
        return state.replace(q=q, ranks=rank_by_similarity(q, state.db))

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}"


class DBA(Reranker):
    r"""Database-side augmentation: each row becomes the (alpha-weighted) sum of itself and its k neighbours.

    Arandjelović and Zisserman, CVPR 2012; alpha-weights as alpha-QE (Radenović et al., TPAMI 2018). The row
    itself is excluded from its neighbours; ties to the lower index; k capped at N - 1.
    See :func:`deepagg.functional.dba`.

    Args:
        k: Number of neighbours, an int >= 0.
        alpha: Weight exponent >= 0 (0 = unit weights).

    Raises:
        ValueError: If ``k`` is not an int >= 0 or ``alpha`` is not a finite number >= 0.

    Shape:
        - db: :math:`(N, D)`, L2-normalised rows.
        - Output: :math:`(N, D)`, L2-normalised, in the dtype of ``db``.

    Example:
        >>> from deepagg.functional import l2n
        >>> DBA(k=10)(l2n(torch.randn(100, 32))).shape
        torch.Size([100, 32])
    """

    def __init__(self, k: int = 10, alpha: float = 0.0) -> None:
        super().__init__()
        self.k, self.alpha = _validate(k, alpha, "DBA")

    def forward(self, db: torch.Tensor) -> torch.Tensor:
        """Augment the database ``db`` :math:`(N, D)`."""
        return dba(db, k=self.k, alpha=self.alpha)

    def rerank(self, state: RerankState) -> RerankState:
        """The re-ranker interface: augmented database, ranked again by cosine similarity."""
        db = self(state.db)
        return state.replace(db=db, ranks=rank_by_similarity(state.q, db))

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}"
