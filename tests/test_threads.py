"""--threads-per-worker T: the same bits for any K and T (step/worker.py ``WorkerState.threaded``)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from distbp.lecture import tree
from distbp.lecture.network import Network
from distbp.step.worker import WorkerState, micro_batches

LAYERS = (5, 12, 7, 3)


def node_values(threads: int, batch: np.ndarray, nodes, X, Y, weights, micro_batch: int) -> np.ndarray:
    state = WorkerState(LAYERS, "tanh", "cross-entropy", X.dtype, X, Y, micro_batch, threads)
    out = np.empty((len(nodes), len(weights)), X.dtype)
    with threadpool_limits(1):
        leaves = state.compute(weights, batch, nodes, out)
    return out, (leaves.errors, leaves.squares)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 100), st.integers(1, 9), st.integers(0, 10**6), st.sampled_from(["float32", "float64"]),
       st.integers(2, 4), st.data())
def test_threads_send_the_bits_of_one_thread(rows, micro_batch, seed, dtype, threads, data):
    """Any batch, any share of its micro-batches, any T: the same node values, losses and squared
    norms (the noise scale's) as T = 1."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((64, LAYERS[0])).astype(dtype)
    Y = rng.integers(0, LAYERS[-1], 64)
    batch = rng.integers(0, 64, rows)
    n = len(micro_batches(rows, micro_batch))
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    nodes = tree.blocks(range(lo, hi), n)
    weights = Network(LAYERS, dtype=dtype, seed=seed % 1000).flat
    one, one_losses = node_values(1, batch, nodes, X, Y, weights, micro_batch)
    many, many_losses = node_values(threads, batch, nodes, X, Y, weights, micro_batch)
    assert one.tobytes() == many.tobytes()
    assert one_losses == many_losses  # Python floats: == is bit equality here (no NaN in them)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_threaded_worker_holds_few_buffers_whatever_its_share(threads):
    """200 micro-batches in one node: at most T + log2(n) leaf buffers a layer (the layers above
    the first are folded at once, micro-batch by micro-batch), not one per leaf."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((64, LAYERS[0])), rng.integers(0, LAYERS[-1], 64)
    state = WorkerState(LAYERS, "tanh", "cross-entropy", X.dtype, X, Y, 1, threads)
    nodes = tree.blocks(range(0, 200), 200)
    out = np.empty((len(nodes), state.layout.size))
    with threadpool_limits(1):
        state.compute(Network(LAYERS).flat, rng.integers(0, 64, 200), nodes, out)
    layers = len(LAYERS) - 1
    assert len(state.pool.free) <= layers * (threads + 8)  # every buffer made is back in the pool


@pytest.mark.parametrize("threads", [1, 3])
def test_a_share_past_the_activation_budget_goes_in_groups_with_the_same_bits(threads, monkeypatch):
    """A worker holds at most ``ACTIVATION_BYTES`` of activations (a group of micro-batches at a
    time, each group backpropagated before the next): the same node values, losses and squared
    norms as one group, a group's workspaces, and the columns said done once, with the last
    group: the layers above the first, then the first."""
    from distbp.step import worker

    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((64, LAYERS[0])), rng.integers(0, LAYERS[-1], 64)
    batch, nodes = rng.integers(0, 64, 40), tree.blocks(range(1, 13), 14)  # 14 micro-batches of 3 rows
    weights = Network(LAYERS).flat
    got = []
    # a workspace of 3 rows: [1, x] of every layer, s, delta, tmp of each layer above the input, e
    two_micro_batches = 2 * 3 * 8 * ((6 + 13 + 8 + 4) + 3 * (12 + 7 + 3) + 1)
    for budget in (1 << 30, two_micro_batches):
        monkeypatch.setattr(worker, "ACTIVATION_BYTES", budget)
        state = WorkerState(LAYERS, "tanh", "cross-entropy", X.dtype, X, Y, 3, threads)
        out, marks = np.empty((len(nodes), state.layout.size)), []
        with threadpool_limits(1):
            leaves = state.compute(weights, batch, nodes, out, done=lambda lo, hi, marks=marks: marks.append((lo, hi)))
        held = sum(len(spaces) for spaces in state.spaces.values())
        got.append((out.tobytes(), leaves.errors, leaves.squares, state._group(), held, marks))
    (whole, *_, all_at_once, held_all, marks_all), (grouped, *_, two, held_two, marks_two) = got
    assert grouped == whole and got[0][1:3] == got[1][1:3]
    assert all_at_once >= 12 and held_all == 12 and two == 2 and held_two == 2
    offsets = state.layout.offsets
    assert marks_all == marks_two == [(offsets[1], offsets[3]), (0, offsets[1])]  # the layers above the first


class Coming:
    """Weights that come in layer by layer, as the direct transport's ``Arrival`` says they do: the
    buffer holds NaN until the compute waits for its columns, so a layer read early shows in the bits."""

    def __init__(self, weights: np.ndarray, buffer: np.ndarray):
        self.weights, self.buffer, self.upto, self.waits = weights, buffer, 0, []
        buffer[:] = np.nan

    def has(self, columns: int) -> bool:
        return columns <= self.upto

    def wait(self, columns: int) -> None:
        self.waits.append(columns)
        self.buffer[self.upto:columns] = self.weights[self.upto:columns]
        self.upto = max(self.upto, columns)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("groups", [False, True])
def test_the_forward_pass_starts_on_layer_1_while_the_layers_above_come(threads, groups, monkeypatch):
    """Weights still coming in: the worker's forward pass goes layer by layer over its micro-batches,
    reading each layer's weights only once they are in (layer 1 first); the same node values,
    losses and squared norms as with the weights all in, for any T, in groups or not."""
    from distbp.step import worker

    if groups:
        monkeypatch.setattr(worker, "ACTIVATION_BYTES", 1)  # a micro-batch at a time
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((64, LAYERS[0])), rng.integers(0, LAYERS[-1], 64)
    batch, nodes = rng.integers(0, 64, 40), tree.blocks(range(2, 11), 14)
    weights = Network(LAYERS).flat
    state = WorkerState(LAYERS, "tanh", "cross-entropy", X.dtype, X, Y, 3, threads)
    got = []
    for coming in (None, Coming(weights, np.empty_like(weights))):
        out = np.empty((len(nodes), state.layout.size))
        with threadpool_limits(1):
            leaves = state.compute(weights if coming is None else coming.buffer, batch, nodes, out, arrival=coming)
        got.append((out.tobytes(), leaves.errors, leaves.squares))
    assert got[1] == got[0]
    assert coming.waits == state.layout.offsets[1:]  # layer by layer, from the first
    assert coming.buffer.tobytes() == weights.tobytes()
    with threadpool_limits(1):  # weights all in: no wait
        state.compute(weights, batch, nodes, out, arrival=coming)
    assert coming.waits == state.layout.offsets[1:]


def test_threads_per_worker_must_be_positive():
    from distbp import Config
    from distbp.errors import UsageError

    with pytest.raises(UsageError, match="--threads-per-worker must be at least 1"):
        Config(threads_per_worker=0).validate()
