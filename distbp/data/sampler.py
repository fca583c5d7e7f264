"""The sampler: each step's global batch, a pure function of (seed, N, B, step).  Pure numpy."""

from __future__ import annotations

import numpy as np


class Sampler:
    """Step ``step``'s global batch (steps count from 1): it never depends on K.

    Each epoch is a fresh seeded permutation of ``range(N)`` cut into ``ceil(N / B)`` batches
    (the last may be smaller).  The only state to checkpoint is the step counter.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = -(-n // batch_size)
        self._epoch, self._perm = -1, None

    def epoch_of(self, step: int) -> int:
        """The epoch (from 1) that step ``step`` (from 1) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def ends_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def samples(self, first: int, last: int) -> int:
        """How many samples steps ``first`` to ``last`` (from 1, inclusive) train on: without a loop,
        since every epoch holds each sample once and all its batches but the last have B."""
        def upto(step: int) -> int:
            epochs, j = divmod(step, self.steps_per_epoch)
            return epochs * self.n + j * self.batch_size
        return upto(last) - upto(first - 1) if last >= first else 0

    def batch(self, step: int) -> np.ndarray:
        """The sample indices of step ``step`` (from 1)."""
        epoch, j = divmod(step - 1, self.steps_per_epoch)  # the permutation of epoch e is seeded [seed, e - 1]
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm[j * self.batch_size:(j + 1) * self.batch_size]
