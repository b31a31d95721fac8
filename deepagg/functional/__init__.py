"""Pure, batched tensor functions: one per op, no state (see :mod:`deepagg.nn` for the modules)."""

from deepagg.functional.coweight import agaussian_center, agaussian_echannel
from deepagg.functional.heat import heat_rerank, hew, hew_weights
from deepagg.functional.normalize import l2n, power_norm
from deepagg.functional.pooling import crow, gem, mac, rmac, rmac_grid, rmac_regions, spoc
from deepagg.functional.qe import dba, query_expansion
from deepagg.functional.whitening import learned_whitening, pca_whitening, whiten

__all__ = [
    "agaussian_center",
    "agaussian_echannel",
    "crow",
    "dba",
    "gem",
    "heat_rerank",
    "hew",
    "hew_weights",
    "l2n",
    "learned_whitening",
    "mac",
    "pca_whitening",
    "power_norm",
    "query_expansion",
    "rmac",
    "rmac_grid",
    "rmac_regions",
    "spoc",
    "whiten",
]
