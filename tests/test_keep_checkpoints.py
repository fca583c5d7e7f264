"""--keep-checkpoints N (the last N as checkpoint-<step>.npz) and --eval-every N (an evaluation
every N steps), alone, across --resume and across a lost server."""

import json
import os

import numpy as np
import pytest
from conftest import train_config
from test_validation import SMALL, refused

from distbp import Callback, Network, Result, cli, fit
from distbp.data.datasets import spirals
from distbp.loops.sync import train
from distbp.run import checkpoint, outdir


def names(run_dir) -> list[str]:
    return sorted(os.listdir(run_dir))


def evaluations(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if "loss" not in r]


def test_the_last_n_are_kept_beside_checkpoint_npz(ray_session, tmp_path):
    summary = train(train_config(tmp_path, steps=9, checkpoint_every=2, keep_checkpoints=2))
    run = summary["out"]
    assert names(run) == ["checkpoint-8.npz", "checkpoint-9.npz", "checkpoint.npz", "metrics.jsonl", "summary.json"]
    assert os.path.samefile(f"{run}/checkpoint-9.npz", f"{run}/checkpoint.npz")  # the latest: one file, two names
    assert checkpoint.load(f"{run}/checkpoint-8.npz")["step"] == 8
    assert checkpoint.sha256_le(Network.from_checkpoint(f"{run}/checkpoint-9.npz").flat) == summary["weights_sha256"]
    assert Result.from_path(run).summary["weights_sha256"] == summary["weights_sha256"]
    # a kept checkpoint is the state of that step: the run stopped there has the same weights
    short = train(train_config(tmp_path, steps=8))
    assert checkpoint.sha256_le(checkpoint.load(f"{run}/checkpoint-8.npz")["weights"]) == short["weights_sha256"]


def test_by_default_only_checkpoint_npz(ray_session, tmp_path):
    run = train(train_config(tmp_path, steps=4, checkpoint_every=2))["out"]
    assert outdir.kept(run) == [] and "checkpoint.npz" in names(run)


def test_resume_goes_on_counting_the_kept_ones(ray_session, tmp_path):
    whole = train(train_config(tmp_path, steps=9, checkpoint_every=2))
    part = train(train_config(tmp_path, steps=5, checkpoint_every=2, keep_checkpoints=3))
    assert outdir.kept(part["out"]) == [2, 4, 5]
    assert cli.main(["train", "--resume", part["out"], "--steps", "9"]) == 0
    assert outdir.kept(part["out"]) == [6, 8, 9]  # the newest 3 of the run's, before and after the resume
    with open(f"{part['out']}/summary.json") as fh:
        assert json.load(fh)["weights_sha256"] == whole["weights_sha256"]
    # --keep-checkpoints may change on resume (it changes no weight): now 1 is kept
    assert cli.main(["train", "--resume", part["out"], "--steps", "11", "--keep-checkpoints", "1"]) == 0
    assert outdir.kept(part["out"]) == [11]


def test_a_kept_checkpoint_appears_whole_linked_or_copied(tmp_path, monkeypatch):
    source = tmp_path / "checkpoint.npz"
    source.write_bytes(b"PK\x03\x04 the checkpoint")
    target = tmp_path / "checkpoint-3.npz"
    target.write_bytes(b"an older checkpoint of step 3")  # a step redone: replaced, never appended to
    checkpoint.link_or_copy(str(source), str(target))
    assert os.path.samefile(source, target)

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # a file system without hard links
    copy = tmp_path / "checkpoint-4.npz"
    checkpoint.link_or_copy(str(source), str(copy))
    assert copy.read_bytes() == source.read_bytes() and not os.path.samefile(source, copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3.npz", "checkpoint-4.npz", "checkpoint.npz"]


def test_evaluations_every_n_steps_and_at_each_epoch_end(ray_session, tmp_path):
    # 1500 spirals, 300 held out: 1200 / 60 = 20 steps an epoch
    config = train_config(tmp_path, steps=22, val_fraction=0.2, eval_every=4)
    summary = train(config)
    evals = evaluations(config.out)
    assert [e["step"] for e in evals] == [4, 8, 12, 16, 20, 22]  # step 20 ends the epoch: evaluated once
    assert all(set(e) == {"step", "epoch", "validation_loss", "validation_accuracy"} for e in evals)
    assert summary["test_accuracy"] == evals[-1]["validation_accuracy"]
    with open(f"{config.out}/metrics.jsonl") as fh:
        order = [(r["step"], "loss" in r) for r in map(json.loads, fh)]
    assert order.index((4, False)) == order.index((4, True)) + 1  # right after its step's line


def test_evaluations_across_resume_and_a_lost_server(ray_session, tmp_path):
    whole = train_config(tmp_path, steps=10, val_fraction=0.2, eval_every=3)
    train(whole)
    part = train(train_config(tmp_path, steps=5, val_fraction=0.2, eval_every=3))["out"]
    assert cli.main(["train", "--resume", part, "--steps", "10"]) == 0
    got, want = evaluations(part), evaluations(whole.out)
    assert [e["step"] for e in got] == [3, 5, 6, 9, 10]  # 5: where the first part ended
    assert [e for e in got if e["step"] != 5] == want  # the same figures: the same weights
    # a server lost at step 4 restarts from the start (no checkpoint yet): step 3 is redone, its
    # evaluation is not written twice
    hit = train_config(tmp_path, steps=10, val_fraction=0.2, eval_every=3, fault_injection="kill-server@4")
    summary = train(hit)
    assert summary["faults"]["server_restarts"] == 1
    assert evaluations(hit.out) == want


@pytest.mark.parametrize("argv, fragment", [
    (["--keep-checkpoints=-1"], "--keep-checkpoints must be >= 0"),
    (["--eval-every=-2"], "--eval-every must be >= 0"),
    (["--eval-every", "5"], "--eval-every 5: spirals has no test split"),
    (["--mode", "async", "--eval-every", "5", "--val-fraction", "0.1"], "--eval-every works only with --mode sync"),
    (["--mode", "async", "--keep-checkpoints", "2"], "--keep-checkpoints works only with --mode sync"),
])
def test_bad_values_are_one_line_and_exit_2(capsys, tmp_path, argv, fragment):
    refused(capsys, tmp_path, SMALL + argv, fragment)


def test_numpy_reads_a_kept_checkpoint_without_pickle(ray_session, tmp_path):
    run = train(train_config(tmp_path, steps=3, keep_checkpoints=1))["out"]
    with np.load(f"{run}/checkpoint-3.npz", allow_pickle=False) as f:
        assert int(f["step"]) == 3


def test_fit_calls_on_evaluation_every_n_steps(ray_session, tmp_path):
    data = spirals(seed=0)
    seen = []

    class Record(Callback):
        def on_evaluation(self, record):
            seen.append(record["step"])

    result = fit(data.X[:1200], data.y[:1200], X_test=data.X[1200:], y_test=data.y[1200:], layers=[2, 8, 3],
                 steps=7, batch_size=60, micro_batch=8, eval_every=2, keep_checkpoints=1, callbacks=[Record()],
                 out=str(tmp_path / "run"))
    assert seen == [2, 4, 6, 7] == [r["step"] for r in result.evaluations if "test_accuracy" in r]
    assert outdir.kept(result.path) == [7]
