"""Tests of the one re-ranker interface: RerankState, Reranker, RerankChain, and each re-ranker's ``rerank``."""

from __future__ import annotations

import pytest
import torch

import deepagg
from deepagg import DBA, HeR, QueryExpansion, RerankChain, Reranker, RerankState
from deepagg import functional as F
from deepagg.nn.rerank import rank_by_similarity


def unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.l2n(torch.randn(n, d, generator=g, dtype=torch.float64))


@pytest.fixture
def qdb() -> tuple[torch.Tensor, torch.Tensor]:
    return unit_rows(4, 8, seed=1), unit_rows(30, 8, seed=2)


def ranks_of(q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    return torch.argsort(q @ db.T, dim=1, descending=True, stable=True)


def test_public_names() -> None:
    assert deepagg.RerankState is RerankState
    assert deepagg.Reranker is Reranker
    assert deepagg.RerankChain is RerankChain
    assert all(issubclass(cls, Reranker) for cls in (QueryExpansion, DBA, HeR, RerankChain))


def test_initial_state_ranks_by_similarity_ties_to_lower_index() -> None:
    db = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    state = RerankState.initial(q, db, db_regions="r")
    assert state.ranks.dtype == torch.int64
    assert state.ranks.tolist() == [[1, 3, 4, 0, 2], [0, 2, 4, 1, 3]]
    assert state.q is q
    assert state.db is db
    assert dict(state.extras) == {"db_regions": "r"}
    assert torch.equal(rank_by_similarity(q, db), state.ranks)


def test_state_is_frozen_and_replace_copies(qdb: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, db = qdb
    state = RerankState.initial(q, db)
    new = state.replace(q=q * 2)
    assert new.db is state.db
    assert new.ranks is state.ranks
    assert torch.equal(new.q, q * 2)
    assert state.q is q
    with pytest.raises(AttributeError):
        state.q = q  # type: ignore[misc]


def test_base_rerank_must_be_implemented(qdb: tuple[torch.Tensor, torch.Tensor]) -> None:
    class Nothing(Reranker):
        pass

    with pytest.raises(NotImplementedError, match=r"Nothing must implement rerank\(state\)"):
        Nothing().rerank(RerankState.initial(*qdb))


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_query_expansion_rerank_is_expansion_then_ranking(qdb: tuple[torch.Tensor, torch.Tensor], alpha: float) -> None:
    q, db = qdb
    out = QueryExpansion(k=5, alpha=alpha).rerank(RerankState.initial(q, db))
    expanded = F.query_expansion(q, db, k=5, alpha=alpha)
    torch.testing.assert_close(out.q, expanded)
    assert out.db is db
    assert torch.equal(out.ranks, ranks_of(expanded, db))


def test_dba_rerank_augments_database_then_ranks(qdb: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, db = qdb
    out = DBA(k=3).rerank(RerankState.initial(q, db))
    augmented = F.dba(db, k=3)
    torch.testing.assert_close(out.db, augmented)
    assert out.q is q
    assert torch.equal(out.ranks, ranks_of(q, augmented))


@pytest.mark.parametrize("variant", ["paper", "hewr"])
def test_her_rerank_is_heat_rerank(qdb: tuple[torch.Tensor, torch.Tensor], variant: str) -> None:
    q, db = qdb
    state = RerankState.initial(q, db)
    her = HeR(k=12, lam=0.5, variant=variant)
    out = her.rerank(state)
    assert out.q is q
    assert out.db is db
    assert torch.equal(out.ranks, F.heat_rerank(q, db, state.ranks, k=12, lam=0.5, variant=variant))
    assert torch.equal(out.ranks[:, 12:], state.ranks[:, 12:])  # only the top k moves
    assert not torch.equal(out.ranks, state.ranks)


def test_chain_equals_manual_composition_and_order_matters(qdb: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, db = qdb
    qe, dba, her = QueryExpansion(k=4), DBA(k=3), HeR(k=20)
    state = RerankState.initial(q, db)
    manual = her.rerank(qe.rerank(dba.rerank(state)))
    chained = RerankChain([dba, qe, her]).rerank(state)
    torch.testing.assert_close(chained.q, manual.q)
    torch.testing.assert_close(chained.db, manual.db)
    assert torch.equal(chained.ranks, manual.ranks)
    # QE on the augmented database is not DBA of the expanded queries' database
    other = RerankChain([qe, dba]).rerank(state)
    first = RerankChain([dba, qe]).rerank(state)
    assert not torch.allclose(other.q, first.q)
    # forward: rankings from cosine similarity through every stage
    assert torch.equal(RerankChain([dba, qe, her])(q, db), manual.ranks)


def test_chain_collects_requires() -> None:
    class NeedsRegions(Reranker):
        requires = ("db_regions",)

    class NeedsGraph(Reranker):
        requires = ("knn_graph", "db_regions")

    chain = RerankChain([NeedsRegions(), QueryExpansion(), NeedsGraph()])
    assert chain.requires == ("db_regions", "knn_graph")


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], r"RerankChain\(\): stages must hold at least one re-ranker; got none\."),
        ([QueryExpansion(), torch.nn.Identity()], r"RerankChain\(\): stages\[1\] must be a Reranker; got Identity\."),
    ],
    ids=["empty", "not-a-reranker"],
)
def test_chain_errors(stages: list[torch.nn.Module], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RerankChain(stages)  # type: ignore[arg-type]


def test_chain_builds_from_yaml_with_hydra() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.create(
        {
            "_target_": "deepagg.RerankChain",
            "stages": [
                {"_target_": "deepagg.QueryExpansion", "k": 10, "alpha": 0.0},
                {"_target_": "deepagg.HeR", "k": 800, "lam": None, "variant": "paper"},
            ],
        }
    )
    chain = instantiate(node)
    assert [type(s).__name__ for s in chain.stages] == ["QueryExpansion", "HeR"]
    assert chain.stages[1].lam == deepagg.nn.heat.HER_DEFAULT_LAM["paper"]
