"""nn.Modules, one per functional op (forward = one call), plus the stateful ones."""

from deepagg.nn.coweight import AGaussianEChannelPool
from deepagg.nn.diffusion import Diffusion
from deepagg.nn.embedding import FisherVectorPool, TEmbPool, VLADPool
from deepagg.nn.heat import HeR, HeWPool
from deepagg.nn.losses import ContrastiveLoss, TripletLoss
from deepagg.nn.mining import HardNegativeMiner
from deepagg.nn.normalize import L2N, PowerNorm
from deepagg.nn.pooling import MAC, RMAC, CroW, GeM, SPoC
from deepagg.nn.qe import DBA, QueryExpansion
from deepagg.nn.rerank import RerankChain, Reranker, RerankState, rank_by_similarity
from deepagg.nn.spatial import DSM
from deepagg.nn.whitening import Whiten

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
    "rank_by_similarity",
]
