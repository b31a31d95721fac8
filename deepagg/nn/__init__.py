"""nn.Modules, one per functional op (forward = one call), plus the stateful ones."""

from deepagg.nn.normalize import *  # noqa: F403
from deepagg.nn.pooling import *  # noqa: F403
from deepagg.nn.qe import *  # noqa: F403
from deepagg.nn.whitening import *  # noqa: F403
