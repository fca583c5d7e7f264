"""Optimizers: written once more the textbook way and compared; dtype kept."""

import numpy as np
import pytest

from distbp.lecture.optim import Hyper, init_state, update


def textbook(optimizer, w, grads, lr, mu=0.9, wd=0.0, scale=None, mask=None):
    """The same updates written plainly in float64, one step at a time."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    mask = np.ones_like(w) if mask is None else mask
    for t, g in enumerate(grads, start=1):
        g = g / scale if scale else g.copy()
        g = g + wd * w * mask
        if optimizer == "sgd":
            w = w - lr * g
        elif optimizer == "momentum":
            v = mu * v + g
            w = w - lr * v
        else:
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            w = w - lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return w


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("scale", [None, 32])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_updates_match_the_textbook(optimizer, scale, wd):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) * 10 for _ in range(4)]
    mask = (np.arange(50) % 5 != 0).astype(np.float64)
    w, state = w0.copy(), init_state(optimizer, 50, np.float64)
    for t, g in enumerate(grads, start=1):
        update(w, g.copy(), state, Hyper(optimizer, 0.9, wd), 0.01, t, scale, mask)
    np.testing.assert_allclose(w, textbook(optimizer, w0, grads, 0.01, wd=wd, scale=scale, mask=mask),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_float32_stays_float32(optimizer):
    w = np.ones(10, dtype=np.float32)
    state = init_state(optimizer, 10, np.float32)
    update(w, np.full(10, 0.5, np.float32), state, Hyper(optimizer, 0.9, 0.1, (0.8, 0.9), 1e-6, 1.0), 0.01, 1, 64.0,
           np.ones(10, np.float32), clip=0.5)
    assert w.dtype == np.float32 and all(b.dtype == np.float32 for b in state.values())


def test_mean_divides_the_sum_once_by_the_global_batch():
    w = np.zeros(3)
    update(w, np.array([8.0, 16.0, 32.0]), {}, Hyper("sgd"), 1.0, 1, scale=8)
    np.testing.assert_array_equal(w, [-1.0, -2.0, -4.0])
