"""--dataset csv:PATH[#label=NAME|INDEX] and distbp convert csv:PATH: the same arrays, and so the same
weights_sha256, as the data saved in an .npz; bad files are one line, exit 2 and nothing created."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import train_config

from distbp import Result, cli
from distbp.data import csvfile, npydir, sources
from distbp.data.datasets import load, load_npz
from distbp.errors import DataError, UsageError
from distbp.loops.sync import train

SMALL = ["--layers", "3,8,3", "--batch-size", "20", "--micro-batch", "8", "--steps", "3"]


def arrays(n=60, d=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


def write_csv(path, X, y, names=None, label_at=None) -> str:
    """X and y as a CSV file, every float as repr writes it (it reads back to the same bits); the
    label is the last column, or column ``label_at``."""
    y = np.asarray(y)
    columns = [[repr(float(v)) for v in X[:, j]] for j in range(X.shape[1])]
    labels = [str(int(v)) if y.dtype.kind in "iu" else repr(float(v)) for v in y.reshape(len(y), -1)[:, 0]]
    at = X.shape[1] if label_at is None else label_at
    columns.insert(at, labels)
    if names is None:
        names = [f"x{j}" for j in range(X.shape[1])]
        names.insert(at, "y")
    with open(path, "w") as fh:
        fh.write(",".join(names) + "\n")
        for row in zip(*columns):
            fh.write(",".join(row) + "\n")
    return str(path)


def write_npz(path, X, y) -> str:
    np.savez(path, X=X, y=y)
    return str(path)


# ---- what loads -------------------------------------------------------------------------------------

def test_the_arrays_are_those_of_the_npz(tmp_path):
    X, y = arrays()
    data, npz = load(f"csv:{write_csv(tmp_path / 'd.csv', X, y)}"), load_npz(write_npz(tmp_path / "d.npz", X, y))
    assert data.X.dtype == np.float64 and data.y.dtype == np.int64 and data.n_classes == npz.n_classes == 3
    assert data.X.tobytes() == npz.X.tobytes() and np.array_equal(data.y, npz.y)
    assert data.X_test is None


@pytest.mark.parametrize("label", ["y", "1", "-3"])
def test_the_label_by_name_or_by_index(tmp_path, label):
    X, y = arrays()
    data = load(f"csv:{write_csv(tmp_path / 'd.csv', X, y, label_at=1)}#label={label}")
    assert data.X.tobytes() == X.tobytes() and np.array_equal(data.y, y)


def test_a_name_wins_over_an_index(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,0,b\n1.5,2,0.25\n2.5,1,0.5\n")  # column "0" is the middle one, index 0 the first
    data = load(f"csv:{path}#label=0")
    assert data.y.tolist() == [2, 1] and data.X.tolist() == [[1.5, 0.25], [2.5, 0.5]]


def test_float_labels_are_regression_targets_as_in_npz(tmp_path):
    X, _ = arrays()
    t = np.random.default_rng(1).standard_normal((60, 1))
    data, npz = load(f"csv:{write_csv(tmp_path / 'd.csv', X, t)}"), load_npz(write_npz(tmp_path / "d.npz", X, t))
    assert data.n_classes is None and data.y.shape == (60, 1) and data.y.tobytes() == npz.y.tobytes()


def test_integers_written_as_floats_are_targets(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,y\n1,0.0\n2,1.0\n")
    assert load(f"csv:{path}").y.tolist() == [[0.0], [1.0]]


def test_header_comment_bom_quotes_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbf# "a", b ,label\r\n1,"2.5",0\r\n\r\n 3 ,4,1\r\n\r\n')
    data = load(f"csv:{path}#label=label")
    assert data.X.tolist() == [[1.0, 2.5], [3.0, 4.0]] and data.y.tolist() == [0, 1]


def test_read_in_chunks_the_same(tmp_path, monkeypatch):
    X, y = arrays(n=103)
    path = write_csv(tmp_path / "d.csv", X, y)
    whole = load(f"csv:{path}")
    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)  # chunks of 3 lines
    chunked = load(f"csv:{path}")
    assert chunked.X.tobytes() == whole.X.tobytes() and np.array_equal(chunked.y, whole.y)
    with open(path, "a") as fh:
        fh.write("1,2,x,0\n")
    with pytest.raises(DataError, match="line 105, column 'x2': 'x' is not a number"):
        load(f"csv:{path}")


def test_error_lines_are_counted_in_later_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)
    X, y = arrays(n=40)
    X[30, 2] = np.nan
    path = write_csv(tmp_path / "d.csv", X, y)
    with pytest.raises(DataError, match=r"column 'x2' contains NaN or inf \(first at line 32\)"):
        load(f"csv:{path}")


@pytest.mark.parametrize("spec, error, words", [
    ("csv:", UsageError, "give the file's path after csv:"),
    ("csv:d.csv#label=", UsageError, "give a column name or index after #label="),
    ("csv:#label=y", UsageError, "give the file's path after csv:"),
])
def test_bad_specs(spec, error, words):
    with pytest.raises(error, match=words):
        csvfile.parse_spec(spec)


# ---- training, through the command line --------------------------------------------------------------

def test_a_csv_trains_from_the_command_line_to_the_bits_of_the_npz(ray_session, tmp_path):
    X, y = arrays()
    path = write_csv(tmp_path / "d.csv", X, y)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--dataset", f"csv:{path}", *SMALL,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 3
    npz = train(train_config(tmp_path, dataset=f"npz:{write_npz(tmp_path / 'd.npz', X, y)}", layers="3,8,3",
                             batch_size=20, micro_batch=8, steps=3))
    assert summary["weights_sha256"] == npz["weights_sha256"]
    result = Result.from_path(str(out))
    assert result.summary["weights_sha256"] == summary["weights_sha256"]
    assert result.network.forward(X).shape == (60, 3)


def test_label_by_name_from_a_config_file_and_targets_train_as_npz(ray_session, tmp_path):
    X, y = arrays()
    named = write_csv(tmp_path / "named.csv", X, y, label_at=0)
    toml = tmp_path / "run.toml"
    toml.write_text(f'dataset = "csv:{named}#label=y"\nlayers = "3,8,3"\nbatch_size = 20\nmicro_batch = 8\n'
                    'steps = 3\n')
    assert cli.main(["train", "--config", str(toml), "--out", str(tmp_path / "by-name")]) == 0
    npz = train(train_config(tmp_path, dataset=f"npz:{write_npz(tmp_path / 'd.npz', X, y)}", layers="3,8,3",
                             batch_size=20, micro_batch=8, steps=3))
    assert Result.from_path(str(tmp_path / "by-name")).summary["weights_sha256"] == npz["weights_sha256"]

    t = np.random.default_rng(1).standard_normal((60, 1))
    options = dict(layers="3,8,1", loss="squared", batch_size=20, micro_batch=8, steps=3)
    runs = [train(train_config(tmp_path, dataset=dataset, **options))["weights_sha256"]
            for dataset in (f"csv:{write_csv(tmp_path / 't.csv', X, t)}", f"npz:{write_npz(tmp_path / 't.npz', X, t)}")]
    assert runs[0] == runs[1]


# ---- what is refused: one line, exit 2, nothing created ---------------------------------------------

BAD = {
    "missing": (None, "no such file"),
    "not-utf8": (b"\xff\xfex,y\n1,0\n", "not a readable CSV file"),
    "empty": (b"", "an empty file; a CSV file starts with a header line"),
    "blank-header": (b"#\n1,2,3,0\n", "the first line is empty"),
    "no-header": (b"1,2,3,0\n4,5,6,1\n", "the first line holds numbers, not column names"),
    "header-only": (b"a,b,c,y\n", "no data lines after the header"),
    "one-column": (b"y\n0\n1\n", "the header names 1 column"),
    "ragged": (b"a,b,c,y\n1,2,3,0\n1,2,0\n", "line 3 has 3 fields but the header names 4 columns"),
    "ragged-first": (b"a,b,c,y\n1,2,3,4,0\n1,2,3,0\n", "line 2 has 5 fields but the header names 4 columns"),
    "non-numeric": (b"a,b,c,y\n1,2,3,0\n1,two,3,0\n", "line 3, column 'b': 'two' is not a number"),
    "empty-field": (b"a,b,c,y\n1,,3,0\n", "line 2, column 'b': is empty"),
    "non-numeric-label": (b"a,b,c,y\n1,2,3,cat\n", "line 2, column 'y': 'cat' is not a number"),
    "nan": (b"a,b,c,y\n1,2,3,0\n1,nan,3,1\n", "column 'b' contains NaN or inf (first at line 3)"),
    "inf": (b"a,b,c,y\n1,2,-inf,0\n", "column 'c' contains NaN or inf (first at line 2)"),
    "overflow": (b"a,b,c,y\n1,2,1e400,0\n", "column 'c' contains NaN or inf (first at line 2)"),
    "nan-target": (b"a,b,c,y\n1,2,3,0.5\n1,2,3,nan\n", "column 'y' contains NaN or inf (first at line 3)"),
    "negative-id": (b"a,b,c,y\n1,2,3,0\n1,2,3,-1\n", "column 'y' has a negative class id (-1 at line 3)"),
    "no-label-name": (b"a,b,c,y\n1,2,3,0\n", "no label column 'species' (columns: a, b, c, y)"),
    "no-label-index": (b"a,b,c,y\n1,2,3,0\n", "no label column 7: the header names 4 columns (0..3)"),
    "two-labels": (b"a,b,y,y\n1,2,3,0\n", "2 columns are named 'y'; choose the label by index"),
    "float-labels": (b"a,b,c,y\n1,2,3,0.5\n1,2,3,1.5\n", "has float targets: use --loss squared"),
    "too-few-rows": (b"a,b,c,y\n1,2,3,0\n1,2,3,2\n", "--batch-size 20 is larger than the training set (2 samples)"),
    "bad-spec": (b"a,b,c,y\n1,2,3,0\n", "give a column name or index after #label="),
}
LABELS = {"no-label-name": "#label=species", "no-label-index": "#label=7", "two-labels": "#label=y",
          "bad-spec": "#label="}
EXTRA = {"float-labels": ["--layers", "3,8,1"]}  # one output: the check of the loss is what is left to fail


def fails(capsys, argv, words):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("distbp: error: "), err
    assert words in err and "Traceback" not in err, err
    return err


def bad_csv(tmp_path, case) -> str:
    content, _ = BAD[case]
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    return f"csv:{path}{LABELS.get(case, '')}"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_csv_is_one_line_exit_2_and_no_run_directory(tmp_path, capsys, case):
    out = tmp_path / "run"
    argv = ["train", "--dataset", bad_csv(tmp_path, case), *SMALL, *EXTRA.get(case, []), "--out", str(out)]
    fails(capsys, argv, BAD[case][1])
    assert not out.exists()


def test_bad_csv_in_the_real_command_has_no_traceback(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(BAD["ragged"][0])
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "distbp", "train", "--dataset", f"csv:{path}", *SMALL,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"distbp: error: {path}: {BAD['ragged'][1]}"]
    assert not out.exists()


# ---- distbp convert csv:PATH ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(npydir, "CACHE", str(tmp_path / "cache"))  # npy:DIR scans its files afresh


@pytest.mark.parametrize("label_at, suffix, flags", [(None, "", []), (1, "", ["--label-column", "y"]),
                                                     (1, "", ["--label-column", "1"]), (1, "#label=y", [])])
def test_convert_writes_the_arrays_in_shards(tmp_path, capsys, monkeypatch, label_at, suffix, flags):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 200)  # chunks straddling the shards
    X, y = arrays(n=103)
    src = f"csv:{write_csv(tmp_path / 'd.csv', X, y, label_at=label_at)}{suffix}"
    assert cli.main(["convert", src, str(tmp_path / "out"), "--rows-per-shard", "40", *flags]) == 0
    assert "103 rows in 3 shards" in capsys.readouterr().out
    Xs, ys, X_test, _ = npydir.open_dir(str(tmp_path / "out"))
    assert Xs[0:103].tobytes() == X.tobytes() and np.array_equal(ys, y) and ys.dtype == np.int64
    assert X_test is None


@pytest.mark.parametrize("src, flags, words", [
    ("csv:{d}#label=y", ["--label-column", "y"], "names the label column and so does --label-column"),
    ("csv:{d}", ["--feature-columns", "x0"], "--feature-columns applies to parquet:PATH only"),
    ("csv:{bad}", [], "line 3, column 'b': 'two' is not a number"),
    ("csv:{d}#label=z", [], "no label column 'z'"),
])
def test_convert_refuses_with_one_line_and_no_dir(tmp_path, capsys, src, flags, words):
    X, y = arrays()
    good = write_csv(tmp_path / "d.csv", X, y)
    (tmp_path / "bad.csv").write_bytes(BAD["non-numeric"][0])
    src = src.format(d=good, bad=tmp_path / "bad.csv")
    fails(capsys, ["convert", src, str(tmp_path / "out"), *flags], words)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".converting")]
