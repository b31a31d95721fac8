"""Pure, batched tensor functions: one per op, no state (see :mod:`deepagg.nn` for the modules)."""

from deepagg.functional.coweight import agaussian_center, agaussian_echannel
from deepagg.functional.embedding import (
    democratic_weights,
    fisher_embedding,
    fit_gmm,
    kmeans,
    triangulation_embedding,
    vlad_embedding,
)
from deepagg.functional.heat import heat_rerank, hew, hew_weights
from deepagg.functional.masks import max_mask, sift_mask, sum_mask
from deepagg.functional.normalize import l2n, power_norm
from deepagg.functional.pooling import crow, gem, mac, rmac, rmac_grid, rmac_regions, spoc
from deepagg.functional.qe import dba, query_expansion
from deepagg.functional.whitening import learned_whitening, pca_whitening, whiten

__all__ = [
    "agaussian_center",
    "agaussian_echannel",
    "crow",
    "dba",
    "democratic_weights",
    "fisher_embedding",
    "fit_gmm",
    "gem",
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
    "vlad_embedding",
    "whiten",
]
