"""A Python user's day: every run loads back, callbacks stop where they say, a Result that fits
in a notebook, warm starts, predictions, and a word when workers will idle."""

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
from test_properties import run_cli

import distbp
from distbp.run import checkpoint
from distbp.run.checkpoint import sha256_le

FASHION = "/usr/share/datasets/fashion-mnist"


def blobs(n=600, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def small(**options):
    return dict(workers=2, batch_size=120, micro_batch=30, steps=20) | options


def dataset_spec(kind: str, tmp_path: Path, capsys) -> str:
    """A ``--dataset`` of each kind, made in ``tmp_path``."""
    X, y = blobs(300)
    if kind in ("spirals", "random:300,5,3"):
        return kind
    if kind == "fashion-mnist":
        if not os.path.isdir(FASHION):
            pytest.skip(f"no Fashion-MNIST in {FASHION} (apt-get install dataset-fashion-mnist)")
        return kind
    np.savez(tmp_path / "d.npz", X=X, y=y)
    if kind == "npz":
        return f"npz:{tmp_path / 'd.npz'}"
    if kind == "npy":
        assert run_cli(["convert", f"npz:{tmp_path / 'd.npz'}", str(tmp_path / "npy")], capsys)[0] == 0
        return f"npy:{tmp_path / 'npy'}"
    if kind == "csv":
        rows = "\n".join(",".join(f"{v!r}" for v in x) + f",{c}" for x, c in zip(X.tolist(), y.tolist()))
        (tmp_path / "d.csv").write_text("a,b,c,d,label\n" + rows + "\n")
        return f"csv:{tmp_path / 'd.csv'}"
    pa = pytest.importorskip("pyarrow", reason="pip install 'distbp[parquet]'")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({**{f"x{i}": X[:, i] for i in range(4)}, "label": y}), tmp_path / "d.parquet")
    # Parquet trains through distbp convert, as an npy:DIR
    assert run_cli(["convert", f"parquet:{tmp_path / 'd.parquet'}", str(tmp_path / "pq"), "--label-column", "label"],
                   capsys)[0] == 0
    return f"npy:{tmp_path / 'pq'}"


@pytest.mark.parametrize("kind", ["spirals", "random:300,5,3", "npz", "npy", "csv", "parquet", "fashion-mnist"])
def test_every_dataset_kind_loads_back_at_default_options(ray_session, tmp_path, capsys, kind):
    """``distbp train`` without --layers: Result.from_path and Network.from_checkpoint rebuild the
    network it trained (the layers the run derived from the data are in its checkpoint)."""
    spec, out = dataset_spec(kind, tmp_path, capsys), tmp_path / "run"
    code, _, err = run_cli(["train", "--dataset", spec, "--steps", "2", "--out", str(out)], capsys)
    assert code == 0, err
    result = distbp.Result.from_path(str(out))
    assert list(result.network.layers) == result.summary["layers"]
    assert result.summary["config"]["layers"] == ",".join(map(str, result.summary["layers"]))
    assert sha256_le(result.network.flat) == result.summary["weights_sha256"]
    again = distbp.Network.from_checkpoint(str(out / "checkpoint.npz"))
    assert sha256_le(again.flat) == result.summary["weights_sha256"]
    if kind == "npz":  # and it goes on from there
        code, _, err = run_cli(["train", "--resume", str(out), "--steps", "3"], capsys)
        assert code == 0, err


@pytest.mark.parametrize("loss", ["cross-entropy", "squared"])
def test_fit_without_layers_derives_them_and_returns_a_result(ray_session, tmp_path, loss):
    X, y = blobs()
    targets = y if loss == "cross-entropy" else np.stack([X[:, 0], X[:, 1] * X[:, 2]], axis=1)
    result = distbp.fit(X, targets, loss=loss, steps=3, out=str(tmp_path / "r"))
    assert result.network.layers == (4, 64, 64, 2)
    predicted = result.network.predict(X[:7])
    assert predicted.shape == ((7,) if loss == "cross-entropy" else (7, 2))


def test_a_checkpoint_from_before_layers_were_recorded_takes_them_from_its_summary(tmp_path):
    net = distbp.Network((3, 5, 2), seed=1)
    path = str(tmp_path / "checkpoint.npz")
    checkpoint.save(path, net.flat, {}, 4, distbp.Config(layers=None).to_dict())
    (tmp_path / "summary.json").write_text(json.dumps({"layers": [3, 5, 2]}))
    assert distbp.Network.from_checkpoint(path).flat.tobytes() == net.flat.tobytes()


@pytest.mark.parametrize("dtype, loss", [("float32", "cross-entropy"), ("float64", "squared")])
def test_network_save_round_trips_and_predicts(tmp_path, dtype, loss):
    net = distbp.Network((4, 8, 3), "relu", loss, dtype, seed=2)
    net.save(str(tmp_path / "net.npz"))
    back = distbp.Network.from_checkpoint(str(tmp_path / "net.npz"))
    assert (back.layers, back.activation, back.loss_name, back.dtype) == (net.layers, "relu", loss, np.dtype(dtype))
    assert back.flat.tobytes() == net.flat.tobytes()
    X = blobs(9)[0]
    out = net.forward(X)
    assert np.array_equal(back.predict(X), out.argmax(axis=1) if loss == "cross-entropy" else out)


class StopAt(distbp.Callback):
    def __init__(self, step):
        self.step, self.seen, self.checkpoints, self.ended = step, [], [], None

    def on_step(self, record):
        self.seen.append(record["step"])
        return record["step"] == self.step

    def on_checkpoint(self, record):
        self.checkpoints.append(record)

    def on_end(self, summary):
        self.ended = summary


@pytest.mark.parametrize("stop", [1, 7, 20])
def test_a_callback_stops_at_the_step_it_returned_true(ray_session, tmp_path, stop):
    """The run ends with that step's weights: those of a run asked for that many steps."""
    X, y = blobs()
    callback = StopAt(stop)
    result = distbp.fit(X, y, **small(out=str(tmp_path / "stopped")), callbacks=[callback])
    assert result.summary["steps"] == stop and callback.seen == list(range(1, stop + 1))
    assert result.summary["stopped_early"] == (stop if stop < 20 else None)
    plain = distbp.fit(X, y, **small(steps=stop, out=str(tmp_path / "plain")))
    assert result.summary["weights_sha256"] == plain.summary["weights_sha256"]
    assert callback.checkpoints[-1] == {"step": stop, "path": str(tmp_path / "stopped" / "checkpoint.npz")}
    assert callback.ended["steps"] == stop
    if stop == 7:  # and fit(resume=) goes on to the bits of the run never stopped
        resumed = distbp.fit(X, y, resume=str(tmp_path / "stopped"), workers=3)
        whole = distbp.fit(X, y, **small(out=str(tmp_path / "whole")))
        assert resumed.summary["weights_sha256"] == whole.summary["weights_sha256"]
        assert resumed.summary["steps"] == 20 and resumed.summary["resumed_from_step"] == 7


def test_early_stopping_stops_inside_a_run_of_windows_at_its_evaluation(ray_session, tmp_path):
    """EarlyStopping on a validation metric watches evaluations only, so steps still run in windows
    between them (the default transport), and the run stops at the evaluation that decided it."""
    X, y = blobs()
    stop = distbp.EarlyStopping("validation_loss", patience=2, min_delta=1.0)  # no change of 1.0: stops soon
    result = distbp.fit(X, y, **small(steps=200, val_fraction=0.2, eval_every=6, out=str(tmp_path / "es")),
                        callbacks=[stop])
    assert stop.best_step == 4 and stop.stopped_step == 8  # evaluations at 4 (epoch end), 6 and 8
    assert result.summary["steps"] == 8 == result.summary["stopped_early"]
    assert result.summary["windows"]["steps"] > 0
    plain = distbp.fit(X, y, **small(steps=8, val_fraction=0.2, out=str(tmp_path / "plain")))
    assert result.summary["weights_sha256"] == plain.summary["weights_sha256"]
    assert [r["step"] for r in result.evaluations] == [4, 6, 8]


def test_early_stopping_refuses_a_metric_the_run_does_not_record(tmp_path):
    X, y = blobs()
    with pytest.raises(distbp.UsageError, match="watches 'validation_loss', which this run does not record"):
        distbp.fit(X, y, **small(out=str(tmp_path / "never")), callbacks=[distbp.EarlyStopping()])
    assert not (tmp_path / "never").exists()
    with pytest.raises(distbp.UsageError, match="patience must be an integer >= 1"):
        distbp.EarlyStopping("loss", patience=0)


def test_result_separates_steps_and_evaluations_and_fits_a_notebook(ray_session, tmp_path):
    X, y = blobs()
    result = distbp.fit(X[:480], y[:480], X_test=X[480:], y_test=y[480:],
                        **small(steps=12, keep_checkpoints=3, out=str(tmp_path / "r")))
    assert [r["step"] for r in result.metrics] == list(range(1, 13)) and result.metrics[-1]["loss"] > 0
    assert [r["step"] for r in result.evaluations] == [4, 8, 12]
    assert all("test_accuracy" in r and "loss" not in r for r in result.evaluations)
    assert len(repr(result)) < 300 and "weights_sha256=" in repr(result) and result.error is None
    frame = result.metrics_dataframe
    assert list(frame["step"]) == list(range(1, 13)) and frame["test_accuracy"].notna().sum() == 3
    losses = {r["step"]: r["test_loss"] for r in result.evaluations}
    best = min(losses, key=losses.get)
    assert result.best_checkpoint("test_loss") == str(tmp_path / "r" / f"checkpoint-{best}.npz") \
        or (best == 12 and result.best_checkpoint("test_loss").endswith("checkpoint-12.npz"))
    with pytest.raises(distbp.UsageError, match="no record has 'validation_loss'"):
        result.best_checkpoint("validation_loss")


def test_a_failed_run_reads_back_with_its_error(ray_session, tmp_path):
    X, y = blobs()
    out = tmp_path / "diverged"
    with pytest.raises(distbp.RunFailed, match="diverged"):
        distbp.fit(X, (y * 1e30)[:, None], loss="squared", layers=[4, 8, 1], optimizer="sgd", lr=1e10,
                   **small(checkpoint_every=1, out=str(out)))
    result = distbp.Result.from_path(str(out))
    assert "diverged" in result.error and result.summary == {} and "error=" in repr(result)
    assert result.network is not None  # its last good checkpoint


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(ray_session, tmp_path, capsys):
    X, y = blobs()
    first = distbp.fit(X, y, **small(steps=5, out=str(tmp_path / "first")))
    still = distbp.fit(X, y, **small(steps=3, lr=0.0, init_from=str(tmp_path / "first"), out=str(tmp_path / "b")))
    assert still.summary["weights_sha256"] == first.summary["weights_sha256"]  # lr 0: the weights it started from
    assert still.summary["init_from"] == str(tmp_path / "first") and still.network.layers == (4, 64, 64, 2)
    moved = distbp.fit(X, y, **small(steps=3, init_from=str(tmp_path / "first" / "checkpoint.npz"),
                                     out=str(tmp_path / "c")))
    assert moved.summary["weights_sha256"] != first.summary["weights_sha256"]
    code, _, err = run_cli(["train", "--dataset", "spirals", "--layers", "2,8,3", "--steps", "2", "--init-from",
                            str(tmp_path / "first"), "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "--layers starts with 2 inputs but" not in err and "another architecture" in err
    assert err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_a_fit_run_is_resumed_from_python_not_the_command_line(ray_session, tmp_path, capsys):
    X, y = blobs()
    distbp.fit(X, y, **small(steps=4, out=str(tmp_path / "r")))
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "r"), "--steps", "8"], capsys)
    assert code == 2 and "trained by distbp.fit on in-memory arrays" in err and "resume=" in err
    with pytest.raises(distbp.UsageError, match=r"choose a new directory \(or resume="):
        distbp.fit(X, y, **small(steps=4, out=str(tmp_path / "r")))


def test_train_says_once_when_workers_will_idle(ray_session, tmp_path, capsys):
    code, _, err = run_cli(["train", "--workers", "3", "--batch-size", "120", "--micro-batch", "60", "--steps", "3",
                            "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and err.count("3 workers but a step has only 2 micro-batches") == 1
    assert "--micro-batch 40 keeps all 3 busy" in err
    code, _, err = run_cli(["train", "--workers", "3", "--batch-size", "61", "--micro-batch", "8", "--steps", "3",
                            "--out", str(tmp_path / "busy")], capsys)
    assert code == 0 and "idle" not in err


def test_idle_workers_are_said_again_for_each_resize():
    from distbp.loops.sync import Steps

    said = []
    steps = types.SimpleNamespace(config=distbp.Config(batch_size=256, micro_batch=128), idle_said=set(),
                                  log=types.SimpleNamespace(progress=types.SimpleNamespace(say=said.append)))
    for live in (1, 2, 3, 3, 4, 2, 3):
        Steps.say_idle(steps, live)
    assert [line.split(" workers")[0] for line in said] == ["distbp: 3", "distbp: 4"]
