"""distbp: data-parallel mini-batch backpropagation on Ray, exact for any number of workers.

The math (``Network``, the optimizers, the exact tree sum) is pure numpy and imports no
Ray; ``distbp.trainer.train`` runs it on Ray actors.
"""

from .config import Config
from .errors import DataError, UsageError
from .network import Network

__all__ = ["Config", "DataError", "Network", "UsageError"]
__version__ = "0.1.0"
