"""An alpha-beta cost model of one synchronous step, fitted to measured step times.  Pure numpy.

A step of ``N`` workers, ``S`` servers, ``P`` parameters and global batch ``B`` (micro-batch
``M``, ``w`` bytes per number) costs

    T = alpha + c * rows * P + beta * bytes

- ``alpha``: per-step latency (task round trips through Ray, the driver's bookkeeping);
- ``rows * P``: the busiest worker's share of the backprop work, ``rows`` its samples; a
  dense layer costs about 6 flops per weight per sample (forward, delta, gradient), so the
  compute rate ``1 / c`` samples*weights/s is ``6 / c`` flop/s;
- ``bytes``: what the busiest server moves per step, the tree nodes it receives from the
  workers plus the weights it sends each of them, ``(nodes + N) * ceil(P / S) * w``
  (``beta`` seconds per byte: 1 / bandwidth).  The server's sum and update are linear in the
  same bytes, so on one machine ``beta`` is an effective rate that includes them.

Fitted by least squares on relative residuals (step times span orders of magnitude), with
every coefficient kept >= 0.  ``predict(..., network_bps=...)`` adds the wire time of an
assumed network on top of the fitted per-byte cost, for extrapolating to more nodes than
the measurement had.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..lecture import cuts
from ..lecture.tree import blocks
from ..step.worker import micro_batches

FLOPS_PER_WEIGHT_SAMPLE = 6  # 2 flops per multiply-add, three GEMMs per layer (forward, delta, gradient)


def features(N: int, S: int, P: int, B: int, M: int, itemsize: int = 8) -> np.ndarray:
    """``[1, rows * P, bytes]`` of one step, as in the module docstring (shape ``(3,)``)."""
    n = len(micro_batches(B, M))
    shares = [part for part in cuts.even(n, N) if part]
    rows = max(min(ids[-1] * M + M, B) - ids[0] * M for ids in shares)
    nodes = sum(len(blocks(ids, n)) for ids in shares)
    moved = (nodes + len(shares)) * math.ceil(P / S) * itemsize
    return np.array([1.0, float(rows * P), float(moved)])


@dataclass
class Fit:
    alpha: float  # seconds per step
    c: float  # seconds per (sample * weight) on one worker
    beta: float  # seconds per byte through the busiest server
    points: int
    median_rel_error: float
    max_rel_error: float

    @property
    def gflops(self) -> float | None:
        """Compute rate of one worker implied by ``c`` (None when the fit put no cost on compute)."""
        return FLOPS_PER_WEIGHT_SAMPLE / self.c / 1e9 if self.c > 0 else None

    @property
    def gbytes_per_s(self) -> float | None:
        """Effective bytes/s through a server implied by ``beta`` (None when the fit put no cost on bytes)."""
        return 1 / self.beta / 1e9 if self.beta > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "gflops_per_worker": self.gflops, "server_gbytes_per_s": self.gbytes_per_s}


def nonnegative_lstsq(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin ||A x - y||`` over ``x >= 0``, by trying every support (A has few columns)."""
    best, best_err = np.zeros(A.shape[1]), float(np.sum(y ** 2))
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            sol, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
            if np.all(sol >= 0):
                err = float(np.sum((A[:, cols] @ sol - y) ** 2))
                if err < best_err:
                    best, best_err = np.zeros(A.shape[1]), err
                    best[list(cols)] = sol
    return best


def fit(X: np.ndarray, T: np.ndarray) -> Fit:
    """Fit ``T ~ X @ [alpha, c, beta]`` (``X`` rows from ``features``, shape ``(n, 3)``) on relative error."""
    X, T = np.asarray(X, dtype=float), np.asarray(T, dtype=float)
    scale = X.max(axis=0)  # columns of very different magnitudes: solve in units of each column's max
    scale[scale == 0] = 1.0
    A = X / scale / T[:, None]  # divide each row by its time: residuals are relative
    coef = nonnegative_lstsq(A, np.ones(len(T))) / scale
    rel = np.abs(X @ coef / T - 1)
    return Fit(float(coef[0]), float(coef[1]), float(coef[2]), len(T), float(np.median(rel)), float(rel.max()))


def predict(model: Fit, N: int, S: int, P: int, B: int, M: int, itemsize: int = 8,
            network_bps: float | None = None) -> float:
    """Step time in seconds; with ``network_bps`` (bits/s, an assumption) each byte also crosses that wire."""
    x = features(N, S, P, B, M, itemsize)
    beta = model.beta + (8.0 / network_bps if network_bps else 0.0)
    return float(model.alpha + model.c * x[1] + beta * x[2])
