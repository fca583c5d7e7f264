"""distbp.fit and distbp.Result: the Python API runs the same exact loop as the command line."""

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import distbp
from distbp.data.datasets import spirals
from distbp.run.checkpoint import sha256_le

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The python block of README's "From Python" section."""
    text = README.read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    result, same, net = namespace["result"], namespace["same"], namespace["net"]
    assert 1 <= result.summary["steps"] <= 40 and result.evaluations and "validation_loss" in result.evaluations[-1]
    assert namespace["more"].summary["steps"] == 60 and namespace["more"].summary["resumed_from_step"]
    assert namespace["tuned"].summary["init_from"] == "runs/net.npz"
    assert sha256_le(result.network.flat) == result.summary["weights_sha256"]
    more = namespace["more"]  # the run directory after its resume
    assert same.summary == more.summary and np.array_equal(net.flat, more.network.flat)
    assert [r["step"] for r in result.metrics if "loss" in r] == list(range(1, result.summary["steps"] + 1))
    assert str(result.summary["weights_sha256"])[:12] in capsys.readouterr().out  # in the Result's repr


def small(**options):
    values = dict(layers=[2, 16, 3], workers=2, batch_size=60, micro_batch=8, steps=6)
    return values | options


def test_fit_is_exact_across_workers_and_matches_train(ray_session, tmp_path):
    """The same bits for K = 1 and 3, and the same as ``distbp train`` on the same arrays (npz)."""
    data = spirals()
    hashes = {K: distbp.fit(data.X, data.y, **small(workers=K, out=str(tmp_path / f"k{K}"))).summary["weights_sha256"]
              for K in (1, 3)}
    np.savez(tmp_path / "d.npz", X=data.X, y=data.y)
    from distbp.loops.sync import train

    cli = train(distbp.Config(dataset=f"npz:{tmp_path / 'd.npz'}", layers="2,16,3", workers=2, batch_size=60,
                              micro_batch=8, steps=6, out=str(tmp_path / "cli")))
    assert hashes[1] == hashes[3] == cli["weights_sha256"]


def test_callbacks_see_steps_and_evaluations_and_can_stop(ray_session, tmp_path):
    data = spirals()

    class Recorder(distbp.Callback):
        def __init__(self):
            self.steps, self.evaluations = [], []

        def on_step(self, record):
            self.steps.append(record)
            return record["step"] >= 9

        def on_evaluation(self, record):
            self.evaluations.append(record)

    rec = Recorder()
    result = distbp.fit(data.X[:1200], data.y[:1200], X_test=data.X[1200:], y_test=data.y[1200:],
                        callbacks=[rec], **small(batch_size=300, steps=40, out=str(tmp_path / "r")))
    stopped = result.summary["steps"]
    assert stopped == 9 and result.summary["stopped_early"] == stopped  # at the step that returned True
    assert [r["step"] for r in rec.steps] == list(range(1, len(rec.steps) + 1)) and len(rec.steps) >= 9
    assert [r["step"] for r in rec.evaluations] == [4, 8]  # 4 steps an epoch
    assert all("test_accuracy" in r for r in rec.evaluations)
    saved = distbp.Network.from_checkpoint(str(tmp_path / "r" / "checkpoint.npz"))
    assert sha256_le(saved.flat) == result.summary["weights_sha256"]
    lines = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert rec.steps == [r for r in lines if "loss" in r][:len(rec.steps)]


@pytest.mark.parametrize("options, error, words", [
    (dict(workers=0), distbp.UsageError, "--workers must be at least 1"),
    (dict(wokers=2), distbp.UsageError, "unknown options wokers"),
    (dict(layers=[3, 16, 3]), distbp.UsageError, "starts with 3 inputs"),
    (dict(steps="5"), distbp.UsageError, "steps must be int"),
    (dict(lr=-1.0), distbp.UsageError, "--lr must be"),
])
def test_fit_validates_like_the_cli(tmp_path, options, error, words):
    data = spirals()
    out = tmp_path / "never"
    with pytest.raises(error, match=re.escape(words)):
        distbp.fit(data.X, data.y, **small(out=str(out)) | options)
    assert not out.exists()


def test_fit_refuses_bad_data(tmp_path):
    data = spirals()
    with pytest.raises(distbp.DataError, match="outside 0..2"):
        distbp.fit(data.X, np.where(data.y == 2, 5, data.y), **small(out=str(tmp_path / "a")))
    with pytest.raises(distbp.UsageError, match="X_test and y_test"):
        distbp.fit(data.X, data.y, X_test=data.X, **small(out=str(tmp_path / "b")))
    assert issubclass(distbp.DataError, distbp.DistbpError) and issubclass(distbp.UsageError, distbp.DistbpError)


def test_fit_fails_at_once_when_the_users_ray_is_too_small(ray_session, tmp_path):
    """The test session's Ray has 16 CPUs: 20 workers cannot be placed, and fit says so at once."""
    data = spirals()
    begun = time.monotonic()
    with pytest.raises(distbp.UsageError, match="has 16 CPUs but the run needs 21"):
        distbp.fit(data.X, data.y, **small(workers=20, out=str(tmp_path / "big")))
    assert time.monotonic() - begun < 20  # not the 60 s placement wait
    assert not (tmp_path / "big").exists()
