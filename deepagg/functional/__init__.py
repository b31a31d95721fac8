"""Pure, batched tensor functions: one per op, no state (see :mod:`deepagg.nn` for the modules)."""

from deepagg.functional.coweight import agaussian_center, agaussian_echannel
from deepagg.functional.diffusion import (
    diffusion_scores,
    gmp_weights,
    knn_lists,
    mutual_knn_affinity,
    normalized_affinity,
    query_seeds,
)
from deepagg.functional.embedding import (
    democratic_weights,
    fisher_embedding,
    fit_gmm,
    kmeans,
    triangulation_embedding,
    vlad_embedding,
)
from deepagg.functional.heat import heat_rerank, hew, hew_weights
from deepagg.functional.losses import contrastive_loss, triplet_loss
from deepagg.functional.masks import max_mask, sift_mask, sum_mask
from deepagg.functional.mining import hard_negatives
from deepagg.functional.mser import BrightRegions, bright_msers
from deepagg.functional.normalize import l2n, power_norm
from deepagg.functional.pooling import crow, gem, mac, rmac, rmac_grid, rmac_regions, spoc
from deepagg.functional.qe import dba, query_expansion
from deepagg.functional.solvers import conjugate_gradient
from deepagg.functional.spatial import LocalFeatures, SpatialMatch, activation_features, mser_regions, spatial_match
from deepagg.functional.whitening import learned_whitening, pca_whitening, whiten

__all__ = [
    "BrightRegions",
    "LocalFeatures",
    "SpatialMatch",
    "activation_features",
    "agaussian_center",
    "agaussian_echannel",
    "bright_msers",
    "conjugate_gradient",
    "contrastive_loss",
    "crow",
    "dba",
    "democratic_weights",
    "diffusion_scores",
    "fisher_embedding",
    "fit_gmm",
    "gem",
    "gmp_weights",
    "hard_negatives",
    "heat_rerank",
    "hew",
    "hew_weights",
    "kmeans",
    "knn_lists",
    "l2n",
    "learned_whitening",
    "mac",
    "max_mask",
    "mser_regions",
    "mutual_knn_affinity",
    "normalized_affinity",
    "pca_whitening",
    "power_norm",
    "query_expansion",
    "query_seeds",
    "rmac",
    "rmac_grid",
    "rmac_regions",
    "sift_mask",
    "spatial_match",
    "spoc",
    "sum_mask",
    "triangulation_embedding",
    "triplet_loss",
    "vlad_embedding",
    "whiten",
]
