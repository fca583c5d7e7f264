"""The gradient noise scale of a step, from numbers the step already has.  Pure Python, no Ray.

McCandlish et al., "An Empirical Model of Large-Batch Training" (2018): with ``G`` the gradient
of the mean loss over the training set and ``Sigma`` the covariance of a per-sample gradient,
the simple noise scale ``B_simple = tr(Sigma) / |G|^2`` predicts the batch size past which a
larger batch stops buying proportionally fewer steps.

A step has both quantities' ingredients.  Each micro-batch ``i`` of ``m_i`` samples is a leaf of
the summation tree: its worker has the leaf's summed gradient ``g_i`` and sends
``|g_i / m_i|^2``, the squared norm of the micro-batch's MEAN gradient (``leaf_square``); the
servers hold the batch's summed gradient and send each block's sum of squares, so
``|G_B|^2 = |sum / B|^2``.  A mean gradient of ``b`` samples drawn WITHOUT replacement from the
``N`` training samples (the sampler cuts each epoch's permutation into batches, and a
micro-batch is a slice of a batch, so both are) has

    E |G_b|^2 = |G|^2 + tr(Sigma) * c(b),    c(b) = (N - b) / (b (N - 1))

(the finite-population correction: ``c(b) = 1/b`` for samples drawn with replacement, 0 for
the whole set), ``tr(Sigma)`` being the population's ``mean_j |g_j - G|^2``.  Two batch sizes
give two equations: the micro-batches (their mean ``x_small`` and mean ``c_small``) and the
batch (``x_big``, ``c(B)``), whence the unbiased estimates of Appendix A.1, generalised to
unequal micro-batches and to sampling without replacement (``estimate``).  Each estimate is
noisy; ``B_simple`` is the ratio of their exponential moving averages, smoothed apart as the
paper does (``NoiseScale``).

Every input is the same bits for any split of the batch: the leaves' values do not depend on
which worker computed them, their sum is ``math.fsum`` (exactly rounded, so no order matters),
and the batch's sum of squares is that of ``--clip-norm`` (step/server.py).  So the noise scale
is the same bits for any number of workers, servers and threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..lecture import cuts

DECAY = 0.99  # the moving averages' weight on the past: about the last 100 steps


def leaf_square(layers: Sequence[float], rows: int) -> float:
    """``|g / rows|^2`` for a micro-batch's summed gradient ``g`` of ``rows`` samples, as a float,
    from ``layers``: each layer's ``np.dot`` of its gradient with itself (on the worker's one BLAS
    thread, as the worker computes the layers: step/worker.py), added exactly (``math.fsum``).
    Bits that depend on the values alone, wherever the buffers lie."""
    return math.fsum(layers) / (rows * rows)


def spread(b: int, n: int) -> float:
    """``c(b)``: how much of ``tr(Sigma)`` the squared norm of a mean over ``b`` of ``n`` samples,
    drawn without replacement, carries on average."""
    return (n - b) / (b * (n - 1)) if n > 1 else 0.0


@dataclass(frozen=True)
class Estimate:
    """One step's unbiased estimates: ``grad_sq`` of ``|G|^2``, ``trace`` of ``tr(Sigma)``."""

    grad_sq: float
    trace: float


def estimate(micro_squares: float, sizes: Sequence[int], batch_square: float, n: int) -> Estimate | None:
    """The estimates of one step whose micro-batches have ``sizes`` rows (summing to ``B``).

    ``micro_squares``: the sum over the micro-batches of ``|G_{m_i}|^2``; ``batch_square``:
    ``|G_B|^2``; ``n``: the training samples the batch was drawn from.  None for a step of a
    single micro-batch: one batch size gives one equation for two unknowns.  (A batch of the
    whole set has ``c(B) = 0``: its ``|G_B|^2`` is ``|G|^2`` itself.)
    """
    B, k = sum(sizes), len(sizes)
    c_small, c_big = math.fsum(spread(m, n) for m in sizes) / k, spread(B, n)
    if k < 2 or not c_small > c_big:
        return None
    x_small = micro_squares / k
    trace = (x_small - batch_square) / (c_small - c_big)
    return Estimate(batch_square - trace * c_big, trace)


class NoiseScale:
    """``B_simple`` from the moving averages of a run's step estimates.  Adam-style bias
    corrections would divide both averages by the same ``1 - decay^count``: the ratio needs none."""

    def __init__(self, decay: float = DECAY):
        self.decay, self.grad_sq, self.trace, self.count = decay, 0.0, 0.0, 0

    def add(self, est: Estimate) -> float | None:
        """Take one step's estimates; returns ``B_simple`` (None while the averaged ``|G|^2`` is
        not positive: early, its estimate may be)."""
        self.count += 1
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * est.grad_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * est.trace
        return self.value()

    def value(self) -> float | None:
        if self.count == 0 or not self.grad_sq > 0:
            return None
        return self.trace / self.grad_sq


class RunNoise:
    """A run's noise scale, step by step: the fields of each step's line of metrics.jsonl.

    ``grad_sq_micro``: the mean over the step's micro-batches of ``|G_m|^2``; ``grad_sq_batch``:
    ``|G_B|^2``; ``grad_sq_estimate`` and ``grad_var_estimate``: the step's unbiased estimates of
    ``|G|^2`` and ``tr(Sigma)`` (null where the step has one micro-batch); ``b_simple``: the
    ratio of their moving averages so far (null until the averaged ``|G|^2`` is positive).
    """

    def __init__(self, n: int, micro_batch: int, decay: float = DECAY):
        """``n``: the training samples the batches are drawn from; ``micro_batch``: M."""
        self.n, self.micro_batch = n, micro_batch
        self.scale = NoiseScale(decay)
        self.trajectory: list[tuple[int, float]] = []  # (step, b_simple) of every step that has one

    def step(self, step: int, batch_size: int, micro_squares: float, batch_sum_square: float) -> dict:
        """Step ``step``'s fields from the exact sum of its micro-batches' ``|G_m|^2`` and the
        squared norm of its SUMMED gradient (the servers')."""
        sizes = [len(r) for r in cuts.fixed(batch_size, self.micro_batch)]
        fields = {"grad_sq_micro": micro_squares / len(sizes), "grad_sq_batch": batch_sum_square / batch_size ** 2}
        est = estimate(micro_squares, sizes, fields["grad_sq_batch"], self.n)
        fields["grad_sq_estimate"] = None if est is None else est.grad_sq
        fields["grad_var_estimate"] = None if est is None else est.trace
        fields["b_simple"] = self._take(step, est)
        return fields

    def replay(self, records: list[dict]) -> None:
        """A resumed run: the averages from the step lines it keeps, as the steps made them."""
        for r in records:
            if "loss" in r:  # a step's line (not an evaluation's)
                est = r.get("grad_sq_estimate")
                self._take(r["step"], None if est is None else Estimate(est, r["grad_var_estimate"]))

    def _take(self, step: int, est: Estimate | None) -> float | None:
        value = self.scale.add(est) if est is not None else self.scale.value()
        if value is not None:
            self.trajectory.append((step, value))
        return value

    def summary(self, points: int = 100) -> dict:
        """summary.json's: the last ``b_simple`` and its trajectory, at most ``points`` of it
        evenly spread over the run (the last among them); every step's is in metrics.jsonl."""
        picked = self.trajectory[::max(1, -(-len(self.trajectory) // points))]
        if self.trajectory and picked[-1] != self.trajectory[-1]:
            picked.append(self.trajectory[-1])
        return {"b_simple": self.trajectory[-1][1] if self.trajectory else None,
                "b_simple_trajectory": {"file": "metrics.jsonl", "key": "b_simple",
                                        "steps": [s for s, _ in picked], "values": [v for _, v in picked]}}


def replayed(records: list[dict], n: int, micro_batch: int) -> dict:
    """``RunNoise.summary`` of a run from its metrics.jsonl ``records``, as its steps made it."""
    run = RunNoise(n, micro_batch)
    run.replay(records)
    return run.summary()
