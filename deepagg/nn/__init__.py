"""nn.Modules, one per functional op (forward = one call), plus the stateful ones."""

from deepagg.nn.normalize import L2N, PowerNorm
from deepagg.nn.pooling import MAC, RMAC, CroW, GeM, SPoC
from deepagg.nn.qe import DBA, QueryExpansion
from deepagg.nn.whitening import Whiten

__all__ = ["DBA", "L2N", "MAC", "RMAC", "CroW", "GeM", "PowerNorm", "QueryExpansion", "SPoC", "Whiten"]
