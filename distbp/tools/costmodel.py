"""An alpha-beta cost model of one synchronous step, fitted to measured step times.  Pure numpy.

A step of ``N`` workers, ``S`` servers, ``P`` parameters and global batch ``B`` (micro-batch
``M``, ``w`` bytes per number) costs

    T = alpha + c * rows * P + beta * bytes

- ``alpha``: per-step latency (task round trips through Ray, the driver's bookkeeping);
- ``rows * P``: the busiest worker's share of the backprop work, ``rows`` its samples; a
  dense layer costs about 6 flops per weight per sample (forward, delta, gradient), so the
  compute rate ``1 / c`` samples*weights/s is ``6 / c`` flop/s;
- ``bytes``: what the busiest end of a transfer moves per step: a server receives the tree
  nodes of the workers' shares and sends each of them its weights, ``(nodes + N) * ceil(P / S)
  * w``; a worker sends its own nodes and receives all P weights, ``(its nodes + 1) * P * w``,
  however many servers share them (``beta`` seconds per byte: 1 / bandwidth).  The server's sum
  and update are linear in the same bytes, so on one machine ``beta`` is an effective rate that
  includes them.

A step has only ``ceil(B / M)`` micro-batches: workers beyond that get no share and idle, so
``features`` (and every prediction) is the same for any N past it.

Fitted by least squares on relative residuals (step times span orders of magnitude), with
every coefficient kept >= 0; ``fit`` refuses (``Underdetermined``) with fewer distinct runs
than constants + 2, or runs that leave a constant undetermined, and names those constants.
``predict(..., network_bps=...)`` adds the wire time of an assumed network on top of the
fitted per-byte cost, for extrapolating to more nodes than the measurement had.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..lecture import cuts
from ..lecture.tree import blocks
from ..step.worker import micro_batches

# the N-nodes x C-cores model lives in nodemodel.py; its names are re-exported here
from .nodemodel import (  # noqa: F401
    FLOPS_PER_WEIGHT_SAMPLE,
    Constants,
    compare,
    markdown,
    ps_step,
    ring_step,
    stops_paying,
    time_to_accuracy,
)

NAMES = ("alpha", "c", "beta")  # the fitted constants, in the order of ``features``' columns
VARY = {"alpha": "runs whose work and bytes differ", "c": "B or K, which set the busiest worker's rows",
        "beta": "K, S or the model, which set the bytes per step"}


def features(N: int, S: int, P: int, B: int, M: int, itemsize: int = 8) -> np.ndarray:
    """``[1, rows * P, bytes]`` of one step, as in the module docstring (shape ``(3,)``)."""
    n = len(micro_batches(B, M))
    shares = [part for part in cuts.even(n, N) if part]  # N > n: the workers past n get nothing
    rows = max(min(ids[-1] * M + M, B) - ids[0] * M for ids in shares)
    nodes = [len(blocks(ids, n)) for ids in shares]
    server = (sum(nodes) + len(shares)) * math.ceil(P / S) * itemsize
    worker = (max(nodes) + 1) * P * itemsize
    return np.array([1.0, float(rows * P), float(max(server, worker))])


class Underdetermined(ValueError):
    """The runs cannot determine every constant of the model (the message names which)."""


def undetermined(X: np.ndarray) -> list[str]:
    """The constants whose column of ``X`` is a combination of the other columns on these rows."""
    A = np.asarray(X, dtype=float).reshape(-1, len(NAMES))
    if not len(A):
        return list(NAMES)
    A = A / np.where(A.max(axis=0) > 0, A.max(axis=0), 1.0)

    def rank(m):
        return np.linalg.matrix_rank(m, tol=1e-9 * max(1.0, np.linalg.norm(A, 2))) if m.size else 0

    full = rank(A)
    return [name for j, name in enumerate(NAMES) if rank(np.delete(A, j, axis=1)) == full]


def check_determined(X: np.ndarray) -> None:
    """Raise ``Underdetermined`` unless ``X`` has at least constants + 2 distinct rows and
    determines every constant (a fit with fewer rows has no residual left to check it)."""
    distinct = np.unique(np.asarray(X, dtype=float), axis=0)
    missing = undetermined(distinct)
    need = len(NAMES) + 2
    if len(distinct) >= need and not missing:
        return
    why = "; ".join(f"{name} (vary {VARY[name]})" for name in missing)
    if not missing:
        why = f"{', '.join(NAMES)} (with {len(distinct)} distinct runs there is no residual to check them)"
    runs = f"{len(X)} run(s)" + (f" ({len(distinct)} distinct in the model's terms)" if len(distinct) < len(X) else "")
    raise Underdetermined(f"cost model not fitted: {runs}, at least {need} distinct needed for {len(NAMES)} "
                          f"constants; cannot determine {why}")


@dataclass
class Fit:
    alpha: float  # seconds per step
    c: float  # seconds per (sample * weight) on one worker
    beta: float  # seconds per byte through the busiest end of a transfer
    points: int  # distinct runs fitted
    median_rel_error: float  # on the runs fitted
    max_rel_error: float
    loo_median_rel_error: float  # each run predicted by the fit to the others (leave-one-out)
    at_zero: tuple[str, ...] = ()  # constants the bound >= 0 held at 0: the data put no cost on them

    @property
    def gflops(self) -> float | None:
        """Compute rate of one worker implied by ``c`` (None when the fit put no cost on compute)."""
        return FLOPS_PER_WEIGHT_SAMPLE / self.c / 1e9 if self.c > 0 else None

    @property
    def gbytes_per_s(self) -> float | None:
        """Effective bytes/s through a server implied by ``beta`` (None when the fit put no cost on bytes)."""
        return 1 / self.beta / 1e9 if self.beta > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "at_zero": list(self.at_zero), "gflops_per_worker": self.gflops,
                "server_gbytes_per_s": self.gbytes_per_s}


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


def _solve(X: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``[alpha, c, beta] >= 0`` minimising the relative residuals of ``T ~ X @ coef``."""
    scale = X.max(axis=0)  # columns of very different magnitudes: solve in units of each column's max
    scale[scale == 0] = 1.0
    A = X / scale / T[:, None]  # divide each row by its time: residuals are relative
    return nonnegative_lstsq(A, np.ones(len(T))) / scale


def fit(X: np.ndarray, T: np.ndarray) -> Fit:
    """Fit ``T ~ X @ [alpha, c, beta]`` (``X`` rows from ``features``, shape ``(n, 3)``) on relative
    error; ``Underdetermined`` when the rows cannot determine it (``check_determined``)."""
    X, T = np.asarray(X, dtype=float), np.asarray(T, dtype=float)
    check_determined(X)
    coef = _solve(X, T)
    rel = np.abs(X @ coef / T - 1)
    keep = np.ones(len(T), dtype=bool)
    loo = []
    for i in range(len(T)):  # each run predicted by the constants the others give
        keep[i] = False
        loo.append(abs(X[i] @ _solve(X[keep], T[keep]) / T[i] - 1))
        keep[i] = True
    return Fit(float(coef[0]), float(coef[1]), float(coef[2]), len(np.unique(X, axis=0)), float(np.median(rel)),
               float(rel.max()), float(np.median(loo)), tuple(n for n, v in zip(NAMES, coef) if v == 0))


def predict(model: Fit, N: int, S: int, P: int, B: int, M: int, itemsize: int = 8,
            network_bps: float | None = None) -> float:
    """Step time in seconds; with ``network_bps`` (bits/s, an assumption) each byte also crosses that wire."""
    x = features(N, S, P, B, M, itemsize)
    beta = model.beta + (8.0 / network_bps if network_bps else 0.0)
    return float(model.alpha + model.c * x[1] + beta * x[2])


def main(argv: list[str] | None = None) -> int:
    """``python -m distbp.tools.costmodel [time-to-accuracy] ...``: the tables of timetarget.py."""
    from .timetarget import main as tables

    return tables(argv)


if __name__ == "__main__":
    raise SystemExit(main())
