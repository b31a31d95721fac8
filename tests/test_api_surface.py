"""The public names: fail loudly when one disappears (kornia's test_api_surface)."""

from __future__ import annotations

import pytest

import deepagg
from deepagg import functional, nn

FUNCTIONAL = [
    "agaussian_center",
    "agaussian_echannel",
    "bright_msers",
    "contrastive_loss",
    "crow",
    "dba",
    "democratic_weights",
    "fisher_embedding",
    "fit_gmm",
    "gem",
    "hard_negatives",
    "heat_rerank",
    "hew",
    "hew_weights",
    "kmeans",
    "l2n",
    "learned_whitening",
    "mac",
    "max_mask",
    "pca_whitening",
    "power_norm",
    "query_expansion",
    "rmac",
    "rmac_grid",
    "rmac_regions",
    "sift_mask",
    "spoc",
    "sum_mask",
    "triangulation_embedding",
    "triplet_loss",
    "vlad_embedding",
    "whiten",
]
MODULES = [
    "AGaussianEChannelPool",
    "ContrastiveLoss",
    "DBA",
    "L2N",
    "MAC",
    "RMAC",
    "CroW",
    "FisherVectorPool",
    "GeM",
    "HardNegativeMiner",
    "HeR",
    "HeWPool",
    "PowerNorm",
    "QueryExpansion",
    "RerankChain",
    "Reranker",
    "SPoC",
    "TEmbPool",
    "TripletLoss",
    "VLADPool",
    "Whiten",
]


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_names(name: str) -> None:
    assert name in functional.__all__
    assert callable(getattr(functional, name))


@pytest.mark.parametrize("name", MODULES)
def test_module_names_top_level(name: str) -> None:
    assert name in nn.__all__
    assert name in deepagg.__all__
    assert getattr(deepagg, name) is getattr(nn, name)
    assert issubclass(getattr(deepagg, name), __import__("torch").nn.Module)


def test_other_public_names() -> None:
    assert callable(deepagg.backbones.vgg16)
    assert callable(deepagg.backbones.mobilenet_v2)
    assert deepagg.compute_map is deepagg.metrics.compute_map
    assert deepagg.evaluate_revisited is deepagg.metrics.evaluate_revisited
    assert isinstance(deepagg.__version__, str)
    assert deepagg.RerankState is nn.RerankState
    assert callable(nn.rank_by_similarity)
    for name in ("HeR", "QueryExpansion", "DBA", "RerankChain"):
        assert issubclass(getattr(deepagg, name), deepagg.Reranker)


def test_all_is_complete() -> None:
    for mod in (deepagg, functional, nn):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.__all__ lists {name} but it is missing"
