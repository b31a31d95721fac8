"""deepagg: batched, differentiable image-retrieval aggregation layers and re-rankers for PyTorch."""

from deepagg import backbones, functional, metrics, nn
from deepagg.nn import *  # noqa: F403

__version__ = "0.1.0"
