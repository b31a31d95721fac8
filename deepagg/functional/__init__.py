"""Pure, batched tensor functions: one per op, no state (see :mod:`deepagg.nn` for the modules)."""

from deepagg.functional.normalize import *  # noqa: F403
from deepagg.functional.pooling import *  # noqa: F403
from deepagg.functional.qe import *  # noqa: F403
from deepagg.functional.whitening import *  # noqa: F403
