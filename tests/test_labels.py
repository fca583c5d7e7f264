"""Labels are checked at Network's public boundary, and a checkpoint rebuilds its Network."""

import numpy as np
import pytest

from distbp.config import Config
from distbp.lecture.network import Network, evaluate
from distbp.run import checkpoint


def data(n=6, d_in=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d_in))


CROSS_ENTROPY_BAD = [
    (np.eye(3)[[0, 1, 2, 0, 1, 2]], "integer class ids"),  # one-hot rows
    ([0, 1, -1, 0, 1, 2], "negative class id -1"),
    ([0, 1, 2, 3, 1, 2], "< d^L = 3"),
    ([0, 1.5, 2, 0, 1, 2], "non-integer value 1.5"),
    ([0, np.nan, 2, 0, 1, 2], "non-integer value nan"),
    ([0, 1, 2, 0, 1], "5 labels but X has 6 rows"),
    ([0, 1, 2, 0, 1, 2, 0], "7 labels but X has 6 rows"),
    (["a", "b", "c", "a", "b", "c"], "must be integers"),
    (np.zeros((6, 3, 1)), "got shape (6, 3, 1)"),
    (1, "got shape ()"),
]


@pytest.mark.parametrize("y, message", CROSS_ENTROPY_BAD)
@pytest.mark.parametrize("method", ["loss", "gradient", "per_sample_gradients"])
def test_bad_class_ids_are_value_errors_naming_the_problem(y, message, method):
    net = Network((3, 5, 3))
    with pytest.raises(ValueError) as info:
        getattr(net, method)(data(), y)
    assert message in str(info.value)


SQUARED_BAD = [
    ([0, 1, -2, 0, 1, 2], "negative class id -2"),
    ([0, 1, 2, 5, 1, 2], "got class id 5"),
    ([0, 0.25, 2, 0, 1, 2], "non-integer value 0.25"),
    (np.zeros((6, 2)), "shape (N, 3) = (N, d^L)"),
    (np.zeros((5, 3)), "5 labels but X has 6 rows"),
]


@pytest.mark.parametrize("y, message", SQUARED_BAD)
def test_bad_squared_error_targets_are_value_errors(y, message):
    net = Network((3, 5, 3), loss="squared")
    for method in ("loss", "gradient", "per_sample_gradients"):
        with pytest.raises(ValueError) as info:
            getattr(net, method)(data(), y)
        assert message in str(info.value)


def test_evaluate_checks_labels_too():
    net = Network((3, 5, 3))
    with pytest.raises(ValueError, match="class id 7"):
        evaluate(net, data(), np.array([0, 1, 2, 7, 1, 2]))
    with pytest.raises(ValueError, match="integer class ids"):
        evaluate(net, data(), np.eye(3)[[0, 1, 2, 0, 1, 2]])
    # One chunk holding all of X would see only the first len(X) labels; the surplus is still refused.
    with pytest.raises(ValueError, match="7 labels but X has 6 rows"):
        evaluate(net, data(), np.array([0, 1, 2, 0, 1, 2, 0]), chunk=6)


def test_good_class_ids_in_any_form_give_the_same_result():
    net = Network((3, 5, 3), seed=2)
    X = data()
    ids = [0, 1, 2, 2, 1, 0]
    forms = [ids, np.array(ids, dtype=np.int32), np.array(ids, dtype=np.uint8), np.array(ids, dtype=np.float64)]
    expected = net.loss(X, np.array(ids))
    for y in forms:
        assert net.loss(X, y) == expected
        assert all(np.array_equal(a, b) for a, b in zip(net.gradient(X, y), net.gradient(X, np.array(ids))))
    loss, acc = evaluate(net, X, ids)
    assert loss == expected / len(X) and 0 <= acc <= 1


def test_squared_error_takes_class_ids_or_targets():
    net = Network((3, 5, 3), loss="squared", seed=2)
    X = data()
    ids = np.array([0, 1, 2, 2, 1, 0])
    onehot = np.eye(3)[ids]
    assert net.loss(X, ids) == net.loss(X, onehot) == net.loss(X, ids.astype(float))
    assert evaluate(net, X, ids) == evaluate(net, X, onehot)
    real = np.random.default_rng(1).standard_normal((6, 3))  # any real targets of shape (N, d^L)
    assert np.isfinite(net.loss(X, real))


def test_empty_batch_is_not_a_label_error():
    net = Network((3, 5, 3))
    assert net.loss(np.empty((0, 3)), np.empty(0, dtype=np.int64)) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_from_checkpoint_round_trips(tmp_path, dtype):
    config = Config(layers="3,5,2", activation="relu", loss="squared", dtype=dtype, seed=4)
    net = Network(config.layer_sizes(), config.activation, config.loss, config.dtype, config.seed)
    path = str(tmp_path / "checkpoint.npz")
    checkpoint.save(path, net.flat, {}, 1, config.to_dict())
    back = Network.from_checkpoint(path)
    assert (back.layers, back.activation, back.loss_name, back.dtype) == ((3, 5, 2), "relu", "squared",
                                                                          np.dtype(dtype))
    assert back.flat.tobytes() == net.flat.tobytes()
    X = data(n=9)
    assert np.array_equal(back.forward(X), net.forward(X))
    assert back.flat.flags.writeable and back.flat.flags.c_contiguous


def test_from_checkpoint_refuses_what_it_cannot_rebuild(tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    net = Network((3, 5, 2))
    checkpoint.save(path, net.flat, {}, 1, Config(layers=None).to_dict())
    with pytest.raises(ValueError, match="does not name its layers"):
        Network.from_checkpoint(path)
    checkpoint.save(path, net.flat, {}, 1, Config(layers="3,6,2").to_dict())
    with pytest.raises(ValueError, match=r"holds 32 weights but layers \(3, 6, 2\) need 38"):
        Network.from_checkpoint(path)
    checkpoint.save(path, net.flat, {}, 1, Config(layers="3,5,2", dtype="float32").to_dict())
    with pytest.raises(ValueError, match="weights are float64 but its config says float32"):
        Network.from_checkpoint(path)
    with pytest.raises(ValueError, match="no checkpoint here"):  # a DataError, which is a ValueError
        Network.from_checkpoint(str(tmp_path / "missing.npz"))
