"""Hard-negative miner module: cirtorch's per-epoch negative selection, with a random pool and a random ablation."""

from __future__ import annotations

import torch
from torch import nn

from deepagg._checks import check_int
from deepagg.functional.mining import _check_mining_inputs, hard_negatives

__all__ = ["HardNegativeMiner"]

_STRATEGIES = ("hardest", "random")


class HardNegativeMiner(nn.Module):
    r"""Pick negatives of other objects for each query, hardest first. See :func:`deepagg.functional.hard_negatives`.

    Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018: each epoch
    cirtorch draws a random pool of candidate images, describes them with the current network and gives every
    query the ``num_negatives`` most similar images of other clusters, one per cluster. The module has no
    parameters; its forward is one call of :func:`deepagg.functional.hard_negatives`, after the optional draws:

    1. ``pool_size`` (when < N): a random subset of ``pool_size`` candidates,
       ``torch.randperm(N, generator=generator)[:pool_size]``, is eligible; the others never are.
    2. ``strategy="random"``: the hardness is ``torch.rand`` (uniform, drawn with ``generator`` after the pool)
       instead of the similarity, so the negatives are random candidates of other objects (an ablation); the
       eligibility rules (labels, ``exclude``, one per label) are the same.

    The draws happen on the CPU (``generator`` is a CPU ``torch.Generator``, or ``None`` for the global one) and are
    moved to the device of the inputs, so a seeded generator gives the same negatives on every device.

    Args:
        num_negatives: Negatives per query, an int >= 1.
        pool_size: ``None`` (every candidate) or an int >= 1: the size of the random candidate pool.
        distinct_labels: Keep at most one negative per label (each -1 candidate is its own label).
        strategy: ``"hardest"`` (similarity) or ``"random"`` (uniform random hardness).

    Raises:
        TypeError: If ``num_negatives`` or ``pool_size`` is not an int, or ``distinct_labels`` is not a bool.
        ValueError: If ``num_negatives`` or ``pool_size`` is < 1, or ``strategy`` is unknown.

    Shape:
        - queries: :math:`(Q, D)`; candidates: :math:`(N, D)`; query_labels: :math:`(Q,)` and candidate_labels:
          :math:`(N,)` integer (-1 = no object); exclude (optional): :math:`(Q, N)` bool.
        - Output: :math:`(Q, \mathrm{num\_negatives})` int64 indices into the full ``candidates``, hardest first,
          -1 padded.

    Example:
        >>> miner = HardNegativeMiner(num_negatives=3, pool_size=10)
        >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> c = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
        >>> idx = miner(q, c, torch.arange(4), torch.arange(30) % 6, generator=torch.Generator().manual_seed(0))
        >>> idx.shape
        torch.Size([4, 3])
        >>> miner
        HardNegativeMiner(num_negatives=3, pool_size=10, distinct_labels=True, strategy='hardest')
    """

    def __init__(
        self,
        num_negatives: int = 5,
        pool_size: int | None = None,
        distinct_labels: bool = True,
        strategy: str = "hardest",
    ) -> None:
        super().__init__()
        fn = "HardNegativeMiner"
        self.num_negatives = check_int(num_negatives, name="num_negatives", fn=fn, minimum=1)
        self.pool_size = None if pool_size is None else check_int(pool_size, name="pool_size", fn=fn, minimum=1)
        if not isinstance(distinct_labels, bool):
            raise TypeError(f"{fn}(): distinct_labels must be a bool; got {type(distinct_labels).__name__}.")
        self.distinct_labels = distinct_labels
        if strategy not in _STRATEGIES:
            raise ValueError(f"{fn}(): strategy must be 'hardest' or 'random'; got {strategy!r}.")
        self.strategy = strategy

    def forward(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        query_labels: torch.Tensor,
        candidate_labels: torch.Tensor,
        exclude: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        r"""Negatives of each query: :math:`(Q, \mathrm{num\_negatives})` int64 indices into ``candidates``, or -1.

        Args:
            queries: Query descriptors :math:`(Q, D)`.
            candidates: Candidate descriptors :math:`(N, D)`.
            query_labels: Object ids :math:`(Q,)`, -1 = no object.
            candidate_labels: Object ids :math:`(N,)`, -1 = no object.
            exclude: Optional bool :math:`(Q, N)`, True = never a negative (positives, junk).
            generator: A CPU ``torch.Generator`` for the pool and the random scores; ``None`` = the global one.

        Raises:
            ValueError: If ``generator`` is not a CPU ``torch.Generator``; otherwise as
                :func:`deepagg.functional.hard_negatives`.
        """
        fn = "HardNegativeMiner.forward"
        _check_mining_inputs(queries, candidates, query_labels, candidate_labels, exclude, None, fn)
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            shown = generator.device if isinstance(generator, torch.Generator) else type(generator).__name__
            raise ValueError(f"{fn}(): generator must be a CPU torch.Generator or None; got {shown}.")
        q, n = queries.shape[0], candidates.shape[0]
        pool: torch.Tensor | None = None
        if self.pool_size is not None and self.pool_size < n:
            # Sorted, so that ties still go to the lower index of the full candidate set.
            pool = torch.randperm(n, generator=generator)[: self.pool_size].sort().values.to(candidates.device)
            candidates, candidate_labels = candidates[pool], candidate_labels[pool]
            exclude = None if exclude is None else exclude[:, pool]
        scores = None
        if self.strategy == "random":
            m = candidates.shape[0]
            scores = torch.rand(q, m, generator=generator, dtype=torch.float64).to(queries.device)
        idx = hard_negatives(
            queries,
            candidates,
            query_labels=query_labels,
            candidate_labels=candidate_labels,
            num_negatives=self.num_negatives,
            exclude=exclude,
            distinct_labels=self.distinct_labels,
            scores=scores,
        )
        if pool is None:
            return idx
        return torch.where(idx >= 0, pool[idx.clamp(min=0)], idx)

    def extra_repr(self) -> str:
        return (
            f"num_negatives={self.num_negatives}, pool_size={self.pool_size}, "
            f"distinct_labels={self.distinct_labels}, strategy={self.strategy!r}"
        )
