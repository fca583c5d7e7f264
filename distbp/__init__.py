"""distbp: data-parallel mini-batch backpropagation on Ray, exact for any number of workers.

The math (``Network``, the optimizers, the exact tree sum) is pure numpy and imports no
Ray; ``distbp.fit`` (or ``distbp train``) runs it on Ray actors.  ``distbp.load_dataset(spec)``
gives the arrays ``--dataset SPEC`` names (``.X``, ``.y``, ``.X_test``, ``.y_test``), for ``fit``.
Importing distbp does not import Ray.
"""

from .api import Callback, EarlyStopping, Result, fit
from .config import Config
from .data.datasets import load as load_dataset
from .errors import DataError, DistbpError, RunFailed, UsageError
from .lecture.network import Network

__all__ = ["Callback", "Config", "DataError", "DistbpError", "EarlyStopping", "Network", "Result", "RunFailed",
           "UsageError", "fit", "load_dataset"]
__version__ = "0.1.0"
