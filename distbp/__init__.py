"""distbp: data-parallel mini-batch backpropagation on Ray, exact for any number of workers.

The math (``Network``, the optimizers, the exact tree sum) is pure numpy and imports no
Ray; ``distbp.fit`` (or ``distbp train``) runs it on Ray actors.  Importing distbp does not
import Ray.
"""

from .api import Callback, Result, fit
from .config import Config
from .errors import DataError, DistbpError, RunFailed, UsageError
from .lecture.network import Network

__all__ = ["Callback", "Config", "DataError", "DistbpError", "Network", "Result", "RunFailed", "UsageError", "fit"]
__version__ = "0.1.0"
