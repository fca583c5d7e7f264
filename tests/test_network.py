"""The network against things computed differently: finite differences and a per-sample loop."""

import numpy as np
import pytest

from distbp import Network
from distbp.lecture.network import ACTIVATIONS, LOSSES


def problem(activation, loss, dtype="float64", n=7, layers=(3, 5, 4, 3), seed=1):
    net = Network(layers, activation, loss, dtype, seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, layers[0]))
    y = rng.integers(0, layers[-1], n) if loss == "cross-entropy" else rng.standard_normal((n, layers[-1]))
    if activation == "relu":  # keep every s away from the kink at 0, where the derivative jumps
        for W in net.weights:
            W[0] += 0.05
    return net, X, y


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_matches_central_differences(activation, loss):
    net, X, y = problem(activation, loss)
    grad = np.concatenate([g.ravel() for g in net.gradient(X, y)])
    h = 1e-6
    numeric = np.empty_like(net.flat)
    for i in range(len(net.flat)):
        saved = net.flat[i]
        net.flat[i] = saved + h
        up = net.loss(X, y)
        net.flat[i] = saved - h
        down = net.loss(X, y)
        net.flat[i] = saved
        numeric[i] = (up - down) / (2 * h)
    rel = np.linalg.norm(grad - numeric) / np.linalg.norm(numeric)
    assert rel <= 1e-6, rel


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_is_the_sum_of_per_sample_gradients(activation, loss):
    net, X, y = problem(activation, loss, n=11)
    for g, per_sample in zip(net.gradient(X, y), net.per_sample_gradients(X, y)):
        assert per_sample.shape == (11,) + g.shape
        summed = per_sample.sum(axis=0)
        assert np.max(np.abs(g - summed)) <= 1e-12 * np.max(np.abs(summed))


def test_per_sample_gradient_is_the_gradient_of_one_sample():
    net, X, y = problem("tanh", "cross-entropy", n=5)
    per_sample = net.per_sample_gradients(X, y)
    for n in range(5):
        for l, g in enumerate(net.gradient(X[n:n + 1], y[n:n + 1])):
            np.testing.assert_allclose(per_sample[l][n], g, rtol=1e-13, atol=1e-15)


def test_loss_is_the_summed_error():
    net, X, y = problem("tanh", "squared", n=6)
    one_by_one = sum(net.loss(X[n:n + 1], y[n:n + 1]) for n in range(6))
    assert net.loss(X, y) == pytest.approx(one_by_one, rel=1e-13)
    # squared error has no 1/2: e = sum_j (h_j - y_j)^2
    assert net.loss(X, y) == pytest.approx(float(np.sum((net.forward(X) - y) ** 2)), rel=1e-13)


def test_weights_follow_the_lecture_layout():
    net = Network((4, 6, 3), seed=0)
    assert [W.shape for W in net.weights] == [(5, 6), (7, 3)]
    assert all(np.all(W[0] == 0) for W in net.weights)  # row 0 is the bias, initialised to 0
    net.weights[1][0, 2] = 5.0  # a view: writing W^2 writes the flat vector
    assert 5.0 in net.flat


def test_cross_entropy_is_stable_for_huge_scores():
    net = Network((2, 3), "identity", "cross-entropy")
    net.weights[0][1] = [1e4, -1e4, 0]
    X, y = np.array([[1.0, 0.0]]), np.array([1])
    assert np.isfinite(net.loss(X, y)) and net.loss(X, y) == pytest.approx(2e4)
    assert np.all(np.isfinite(np.concatenate([g.ravel() for g in net.gradient(X, y)])))
    np.testing.assert_allclose(net.forward(X).sum(axis=1), 1.0)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("loss", LOSSES)
def test_float32_stays_float32(activation, loss):
    net, X, y = problem(activation, loss, dtype="float32")
    assert net.flat.dtype == np.float32
    assert all(W.dtype == np.float32 for W in net.weights)
    assert all(g.dtype == np.float32 for g in net.gradient(X, y))
    assert all(g.dtype == np.float32 for g in net.per_sample_gradients(X, y))
    assert net.forward(X).dtype == np.float32
    ws = net.workspace(len(X))
    assert all(b.dtype == np.float32 for b in ws.x + ws.s[1:] + ws.delta[1:] + [ws.e])


def test_float32_gradient_is_close_to_float64():
    net64, X, y = problem("tanh", "cross-entropy")
    net32 = Network(net64.layers, "tanh", "cross-entropy", "float32", seed=1)
    for g32, g64 in zip(net32.gradient(X, y), net64.gradient(X, y)):
        np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(activation="swish"), dict(loss="hinge"), dict(dtype="float16"),
                                 dict(layers=(3,))])
def test_bad_construction_is_refused(bad):
    args = dict(layers=(3, 4, 2)) | bad
    with pytest.raises(ValueError):
        Network(**args)
