"""Options and input data are checked before anything starts: each bad value ends in one line on
stderr and exit status 2, with no traceback and no run directory (issue: adversarial inputs).

Every case fails before Ray is needed, so they run ``distbp.cli.main`` in this process.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distbp import cli, options
from distbp.config import Config
from distbp.data import datasets
from distbp.data.problem import memory_needed, prepare
from distbp.errors import DataError, UsageError
from distbp.lecture.network import Layout
from distbp.run import checkpoint

SMALL = ["--dataset", "spirals", "--layers", "2,16,16,3", "--batch-size", "60", "--micro-batch", "8", "--steps", "2"]


def refused(capsys, tmp_path: Path, argv: list[str], fragment: str) -> str:
    """``distbp train ARGV --out tmp/run`` exits 2 with one line naming the problem and makes no run directory."""
    out = tmp_path / "run"
    code = cli.main(["train", *argv] + ([] if "--out" in argv or "--resume" in argv else ["--out", str(out)]))
    stdout, err = capsys.readouterr()
    assert code == 2, err
    assert stdout == ""
    assert len(err.splitlines()) == 1 and err.startswith("distbp: error: "), err
    assert "Traceback" not in err
    assert fragment in err, err
    assert not out.exists()
    return err


def write_npz(tmp_path: Path, name: str = "data.npz", **arrays) -> str:
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


def X_y(n: int = 100, d: int = 2, classes: int = 3):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def npy_bytes(header: str, payload: bytes = b"", version: int = 1) -> bytes:
    """A .npy member written by hand, so a test can make its header say anything."""
    magic = b"\x93NUMPY" + bytes([version, 0])
    size_bytes = 2 if version == 1 else 4
    body = header.encode("latin1")
    body += b" " * (63 - (len(magic) + size_bytes + len(body)) % 64) + b"\n"
    return magic + len(body).to_bytes(size_bytes, "little") + body + payload


def hand_npz(tmp_path: Path, x_member: bytes) -> str:
    """An npz whose X is ``x_member`` (bytes of a .npy) and whose y is a real array."""
    path = str(tmp_path / "hand.npz")
    buf = io.BytesIO()
    np.save(buf, np.zeros(2, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.npy", x_member)
        archive.writestr("y.npy", buf.getvalue())
    return path


# ---------------------------------------------------------------- --seed


def test_negative_seed_flag(tmp_path, capsys):
    refused(capsys, tmp_path, [*SMALL, "--seed", "-1"], "--seed must be >= 0, got -1")


def test_negative_seed_in_toml(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("seed = -1\n")
    refused(capsys, tmp_path, [*SMALL, "--config", str(toml)], "--seed must be >= 0, got -1")


def test_negative_seed_in_a_checkpoint_config(tmp_path, capsys):
    run = tmp_path / "saved"
    run.mkdir()
    config = Config(dataset="spirals", layers="2,16,16,3", batch_size=60, micro_batch=8, steps=2,
                    optimizer="sgd", seed=-1, out=str(run))
    checkpoint.save(str(run / "checkpoint.npz"), np.zeros(Layout((2, 16, 16, 3)).size), {}, 2, config.to_dict())
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {t}, "epoch": 1, "loss": 1.0, "time": {t}}}\n'
                                               for t in (1, 2)))  # the log a run leaves up to its checkpoint
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    err = refused(capsys, tmp_path, ["--resume", str(run), "--steps", "4"], "--seed must be >= 0")
    assert "checkpoint.npz" in err  # the file is to blame, not a flag the user gave
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ---------------------------------------------------------------- --fault-injection


@pytest.mark.parametrize("spec, fragment", [
    ("delay-worker:0@1:1.2.3", "the delay must be a number of seconds"),
    ("delay-worker:0@1:e", "the delay must be a number of seconds"),
    ("delay-worker:0@1:1e999", "finite number of seconds"),
    ("delay-worker:0@1:-1", "finite number of seconds >= 0"),
    ("delay-worker:0@1:", "cannot read"),
    ("kill-worker:0@1:5", "cannot read"),
    ("kill-worker:x@1", "cannot read"),
    ("explode@1", "cannot read"),
    ("kill-worker:0@0", "steps count from 1"),
    ("kill-worker:2@1", "there are only 2 workers"),
    ("kill-worker:0@1,delay-worker:0@1:0.5", "already strikes worker 0 at step 1"),
    ("kill-server@1,kill-server@1", "already strikes the server at step 1"),
])
def test_malformed_fault_is_one_line(tmp_path, capsys, spec, fragment):
    refused(capsys, tmp_path, [*SMALL, "--workers", "2", "--fault-injection", spec], fragment)


def test_fault_after_the_last_step_is_refused(tmp_path, capsys):
    refused(capsys, tmp_path, [*SMALL, "--fault-injection", "kill-worker:0@3"],
            "kill-worker:0@3: step 3 is after the run's last step (2)")


def test_fault_on_the_last_step_is_accepted(tmp_path):
    config = Config(dataset="spirals", layers="2,16,16,3", batch_size=60, micro_batch=8, steps=2,
                    fault_injection="kill-worker:0@2,kill-server@2", out=str(tmp_path / "run"))
    config.validate()
    assert prepare(config).total_steps == 2
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- TOML files


def test_toml_with_a_non_utf8_byte(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_bytes(b"seed = 1\n# caf\xe9\n")
    refused(capsys, tmp_path, [*SMALL, "--config", str(toml)], "not UTF-8 text (byte 0xe9")


def test_toml_with_one_option_under_two_spellings(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("batch-size = 60\nbatch_size = 30\n")
    refused(capsys, tmp_path, [*SMALL, "--config", str(toml)],
            "'batch-size' and 'batch_size' are the same option")


# ---------------------------------------------------------------- empty and out-of-range options


@pytest.mark.parametrize("name", ["--out", "--data-dir", "--address"])
def test_empty_path_options_are_refused(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # an ignored --out '' would make runs/<timestamp> here
    refused(capsys, tmp_path, [*SMALL, name, ""], f"{name} must not be empty")
    assert os.listdir(tmp_path) == []


def test_empty_resume_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an ignored --resume '' would start a new run in runs/<timestamp>
    refused(capsys, tmp_path, [*SMALL, "--resume", ""], "--resume must not be empty")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ["5", "1", "-0.1", "nan"])
def test_momentum_outside_0_1_is_refused(tmp_path, capsys, value):
    refused(capsys, tmp_path, [*SMALL, "--optimizer", "momentum", "--momentum", value], "--momentum must be in [0, 1)")


def test_momentum_just_below_1_is_accepted():
    Config(optimizer="momentum", momentum=0.999).validate()


def test_epochs_beyond_counting(tmp_path, capsys):
    argv = [a for a in SMALL if a not in ("--steps", "2")]
    refused(capsys, tmp_path, [*argv, "--epochs", "1e308"], "more steps than can be counted")


# ---------------------------------------------------------------- npz files


def test_npy_file_given_as_npz(tmp_path, capsys):
    path = str(tmp_path / "plain.npy")
    np.save(path, np.zeros((10, 2)))
    refused(capsys, tmp_path, [*SMALL, "--dataset", f"npz:{path}"], "a .npy file (one array), not an .npz archive")


def test_npz_header_claiming_1e13_items(tmp_path, capsys):
    member = npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (10000000000000,), }", b"\0" * 64)
    path = hand_npz(tmp_path, member)
    refused(capsys, tmp_path, [*SMALL, "--dataset", f"npz:{path}"], "declares shape (10000000000000,) of float64")


def test_npz_larger_than_memory(tmp_path, capsys, monkeypatch):
    X, y = X_y()
    path = write_npz(tmp_path, X=X, y=y)
    monkeypatch.setattr(datasets, "memory_available", lambda: 1000)  # X alone is 1600 bytes
    refused(capsys, tmp_path, [*SMALL, "--dataset", f"npz:{path}"], "needs about 2.3 KiB of memory")


def test_npz_with_a_200kb_header(tmp_path, capsys):
    member = npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }" + " " * 200_000,
                       b"\0" * 16, version=2)
    path = hand_npz(tmp_path, member)
    refused(capsys, tmp_path, [*SMALL, "--dataset", f"npz:{path}"], "array 'X' has an unreadable header")


def test_npz_label_2_pow_40_with_default_layers(tmp_path, capsys):
    X, y = X_y()
    y[0] = 2 ** 40
    path = write_npz(tmp_path, X=X, y=y)
    argv = ["--dataset", f"npz:{path}", "--batch-size", "50", "--steps", "2"]
    refused(capsys, tmp_path, argv, "its labels go up to 1099511627776")


def test_npz_label_2_pow_40_with_given_layers(tmp_path, capsys):
    X, y = X_y()
    y[0] = 2 ** 40
    path = write_npz(tmp_path, X=X, y=y)
    argv = ["--dataset", f"npz:{path}", "--layers", "2,8,3", "--batch-size", "50", "--steps", "2"]
    refused(capsys, tmp_path, argv, "--layers ends with 3 outputs but")


# ---------------------------------------------------------------- sizes against memory


def test_random_data_larger_than_memory(tmp_path, capsys):
    refused(capsys, tmp_path, ["--dataset", "random:1000000000,1000,10", "--steps", "2"],
            "--dataset random:1000000000,1000,10 needs about 7.4 TiB of memory")


def test_network_larger_than_memory(tmp_path, capsys):
    refused(capsys, tmp_path, [*SMALL, "--layers", "2,10000000000,3"], "--layers 2,10000000000,3: 60000000003 weights")


def test_network_of_astronomical_size(tmp_path, capsys):
    refused(capsys, tmp_path, [*SMALL, "--layers", "2," + "9" * 400 + ",3"], "bytes of memory")


def test_memory_estimate_counts_every_local_actor_once_per_actor():
    data = datasets.load("spirals")
    layers = (2, 1000, 1000, 3)
    local = memory_needed(Config(workers=8, layers="2,1000,1000,3"), data, layers)
    fewer = memory_needed(Config(workers=2, layers="2,1000,1000,3"), data, layers)
    cluster = memory_needed(Config(workers=8, layers="2,1000,1000,3", address="auto"), data, layers)
    vector = Layout(layers).size * 8
    assert local - fewer >= 6 * 2 * vector  # each worker holds at least the weights and a gradient
    assert cluster < fewer  # on a cluster this machine holds the driver and one actor


# ---------------------------------------------------------------- IDX


def idx_bytes(arr: np.ndarray) -> bytes:
    """A uint8 IDX file, written by hand."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_constant_idx_images_standardise_without_warnings(tmp_path):
    arrays = {"train-images-idx3-ubyte": np.zeros((6, 28, 28), np.uint8),
              "train-labels-idx1-ubyte": (np.arange(6) % 10).astype(np.uint8),
              "t10k-images-idx3-ubyte": np.full((4, 28, 28), 7, np.uint8),
              "t10k-labels-idx1-ubyte": np.arange(4).astype(np.uint8)}
    for name, arr in arrays.items():
        (tmp_path / name).write_bytes(idx_bytes(arr))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = datasets.load("fashion-mnist", str(tmp_path))
    assert np.all(data.X == 0)  # centred, divided by 1
    assert np.allclose(data.X_test, 7 / 255)


# ---------------------------------------------------------------- every message is one line


def test_messages_of_config_errors_are_one_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('seed = [1,\n2\n')  # tomllib's message for this names a line and column
    with pytest.raises(UsageError) as exc:
        options.load_toml(str(toml))
    assert "\n" not in str(exc.value)


def test_data_errors_from_numpy_are_one_line(tmp_path):
    member = npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }" + " " * 200_000,
                       b"\0" * 16, version=2)
    with pytest.raises(DataError) as exc:
        datasets.load_npz(hand_npz(tmp_path, member))
    assert "\n" not in str(exc.value)
