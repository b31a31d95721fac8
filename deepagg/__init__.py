"""deepagg: batched, differentiable image-retrieval aggregation layers and re-rankers for PyTorch.

Modules are re-exported at the top level (``from deepagg import GeM``); the functions live in
:mod:`deepagg.functional`, the backbones in :mod:`deepagg.backbones`, the evaluation in :mod:`deepagg.metrics`.
"""

from deepagg import backbones, functional, metrics, nn
from deepagg.metrics import compute_map, evaluate_revisited
from deepagg.nn import (
    DBA,
    DSM,
    L2N,
    MAC,
    RMAC,
    AGaussianEChannelPool,
    ContrastiveLoss,
    CroW,
    Diffusion,
    FisherVectorPool,
    GeM,
    HardNegativeMiner,
    HeR,
    HeWPool,
    PowerNorm,
    QueryExpansion,
    RerankChain,
    Reranker,
    RerankState,
    SPoC,
    TEmbPool,
    TripletLoss,
    VLADPool,
    Whiten,
)

__version__ = "0.1.0"

__all__ = [
    "DBA",
    "DSM",
    "L2N",
    "MAC",
    "RMAC",
    "AGaussianEChannelPool",
    "ContrastiveLoss",
    "CroW",
    "Diffusion",
    "FisherVectorPool",
    "GeM",
    "HardNegativeMiner",
    "HeR",
    "HeWPool",
    "PowerNorm",
    "QueryExpansion",
    "RerankChain",
    "RerankState",
    "Reranker",
    "SPoC",
    "TEmbPool",
    "TripletLoss",
    "VLADPool",
    "Whiten",
    "__version__",
    "backbones",
    "compute_map",
    "evaluate_revisited",
    "functional",
    "metrics",
    "nn",
]
