"""--report-to tensorboard,mlflow: the trackers get what metrics.jsonl has, read back with their own readers.

TensorBoard's files are read with TensorBoard's EventAccumulator, MLflow's run with MlflowClient
on a local file store: not with anything of ours.  A resumed run (one that died after its last
checkpoint) must leave each step once in TensorBoard and go on in the same MLflow run.
"""

import os
import shutil

import numpy as np
import pytest

from distbp import cli
from distbp.run import metrics
from distbp.run.outdir import CHECKPOINT, SUMMARY
from tests.conftest import train_config

NEEDS = 'tensorboardX writes and tensorboard reads the event files here: pip install -e ".[dev]"'
pytest.importorskip("tensorboardX", reason=NEEDS)
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", reason=NEEDS)

# 1200 training samples (20% of the spirals held out), batch 200: 6 steps an epoch, an evaluation each.
OPTIONS = dict(val_fraction=0.2, batch_size=200, micro_batch=25, steps=12, checkpoint_every=4)


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``run_dir/tensorboard`` as TensorBoard itself loads it: tag -> [(step, value)]."""
    acc = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def crashed_after_checkpoint(tmp_path, config, at: int):
    """Run ``config`` to its end, keeping the checkpoint of step ``at``; then put that checkpoint
    back and drop summary.json: the directory of a run that died after step ``config.steps`` with
    its last checkpoint at step ``at`` (metrics.jsonl and the trackers have the steps after it)."""
    from distbp.loops.sync import train

    kept = tmp_path / "kept.npz"

    class KeepCheckpoint:
        def on_step(self, record):
            if record["step"] == at + 1:  # the checkpoint on disk is of step ``at``
                shutil.copy(os.path.join(config.out, CHECKPOINT), kept)

    train(config, callbacks=[KeepCheckpoint()])
    shutil.copy(kept, os.path.join(config.out, CHECKPOINT))
    os.unlink(os.path.join(config.out, SUMMARY))


def test_tensorboard_has_every_step_and_evaluation_of_metrics_jsonl(ray_session, tmp_path):
    from distbp.loops.sync import train

    config = train_config(tmp_path, report_to="tensorboard", **OPTIONS)
    summary = train(config)
    records = metrics.read(os.path.join(config.out, metrics.NAME))
    seen = scalars(config.out)
    steps = metrics.steps(records)
    assert [s for s, _ in seen["train/loss"]] == list(range(1, 13))
    # TensorBoard keeps float32
    np.testing.assert_allclose([v for _, v in seen["train/loss"]], [r["loss"] for r in steps], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in seen["train/lr"]], [r["lr"] for r in steps], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in seen["perf/worker_compute_s"]], [r["worker_compute"] for r in steps],
                               rtol=1e-6)
    assert [v for _, v in seen["perf/server0_bytes_in"]] == [r["server_bytes_in"][0] for r in steps]
    assert all(v > 0 for _, v in seen["perf/samples_per_second"])
    noisy = [r for r in steps if r["b_simple"] is not None]  # the gradient noise scale, once defined
    assert noisy and [s for s, _ in seen["noise/b_simple"]] == [r["step"] for r in noisy]
    np.testing.assert_allclose([v for _, v in seen["noise/b_simple"]], [r["b_simple"] for r in noisy], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in seen["noise/grad_sq_batch"]], [r["grad_sq_batch"] for r in steps],
                               rtol=1e-6)
    evaluations = [r for r in records if "validation_accuracy" in r]
    assert [s for s, _ in seen["eval/validation_accuracy"]] == [r["step"] for r in evaluations] == [6, 12]
    np.testing.assert_allclose([v for _, v in seen["eval/validation_accuracy"]],
                               [r["validation_accuracy"] for r in evaluations], rtol=1e-6)
    plain = train(train_config(tmp_path, workers=3, **OPTIONS))
    assert summary["weights_sha256"] == plain["weights_sha256"]  # reporting changes no bit, for any K


def test_tensorboard_after_resume_has_each_step_once(ray_session, tmp_path):
    """Steps 9-12 were written before the "crash"; the resumed run redoes them (and goes on to 16):
    purge_step makes TensorBoard drop the first copies, as resume trims metrics.jsonl."""
    config = train_config(tmp_path, report_to="tensorboard", **OPTIONS)
    crashed_after_checkpoint(tmp_path, config, at=8)
    assert [s for s, _ in scalars(config.out)["train/loss"]] == list(range(1, 13))
    assert cli.main(["train", "--resume", config.out, "--steps", "16"]) == 0
    seen = scalars(config.out)
    assert [s for s, _ in seen["train/loss"]] == list(range(1, 17))
    steps = metrics.steps(metrics.read(os.path.join(config.out, metrics.NAME)))
    np.testing.assert_allclose([v for _, v in seen["train/loss"]], [r["loss"] for r in steps], rtol=1e-6)
    assert [s for s, _ in seen["eval/validation_loss"]] == [6, 12, 16]  # the epochs and the last step


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow file store in tmp_path, and a client on it."""
    mlflow = pytest.importorskip("mlflow", reason='mlflow is not installed: pip install -e ".[dev]"')
    uri = "file:" + str(tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.MlflowClient(uri)


def the_run(client, run_dir):
    [run] = client.search_runs([client.get_experiment_by_name("distbp").experiment_id])
    assert run.data.tags["distbp.out"] == os.path.abspath(run_dir)
    return run


def test_mlflow_gets_params_metrics_and_artifacts_from_fit(ray_session, tmp_path, mlflow_store):
    import distbp
    from distbp.data.datasets import spirals

    data = spirals()
    out = str(tmp_path / "fit")
    result = distbp.fit(data.X, data.y, layers=[2, 16, 3], workers=2, lr=0.02, out=out,
                        report_to=["mlflow", "tensorboard"], **OPTIONS)
    run = the_run(mlflow_store, out)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.02" and run.data.params["report_to"] == "mlflow,tensorboard"
    history = mlflow_store.get_metric_history(run.info.run_id, "train.loss")
    steps = metrics.steps(result.metrics)
    assert [m.step for m in history] == list(range(1, 13))
    assert [m.value for m in history] == [r["loss"] for r in steps]  # float64 kept
    noise = mlflow_store.get_metric_history(run.info.run_id, "noise.grad_sq_micro")
    assert [m.value for m in noise] == [r["grad_sq_micro"] for r in steps]
    accuracy = mlflow_store.get_metric_history(run.info.run_id, "eval.validation_accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(r["step"], r["validation_accuracy"])
                                                     for r in result.evaluations]
    artifacts = {a.path for a in mlflow_store.list_artifacts(run.info.run_id)}
    assert artifacts == {"summary.json", "checkpoint.npz"}
    got = mlflow_store.download_artifacts(run.info.run_id, "checkpoint.npz", str(tmp_path))
    assert distbp.Network.from_checkpoint(got).flat.tobytes() == result.network.flat.tobytes()


def test_mlflow_resumed_run_goes_on_in_the_same_run(ray_session, tmp_path, mlflow_store):
    config = train_config(tmp_path, report_to="mlflow", **OPTIONS)
    crashed_after_checkpoint(tmp_path, config, at=8)
    first = the_run(mlflow_store, config.out)
    assert first.info.status == "FINISHED"  # it wrote its summary before the "crash"
    assert cli.main(["train", "--resume", config.out, "--steps", "16"]) == 0
    run = the_run(mlflow_store, config.out)  # still one run
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    history = mlflow_store.get_metric_history(run.info.run_id, "train.loss")
    loss = {r["step"]: r["loss"] for r in metrics.steps(metrics.read(os.path.join(config.out, metrics.NAME)))}
    assert sorted({m.step for m in history}) == list(range(1, 17))
    # steps 9-12 were sent twice (before the crash and redone): with the same bits
    assert all(m.value == loss[m.step] for m in history)
    assert "distbp.resumed_from_step.8" in run.data.tags


@pytest.mark.parametrize("names, said", [("mlflow", 'pip install -e ".[mlflow]"'),
                                         ("tensorboard", 'pip install -e ".[tensorboard]"'),
                                         ("wandb", "unknown value 'wandb'")])
def test_a_missing_extra_or_unknown_name_is_one_line_and_creates_nothing(names, said, tmp_path, monkeypatch,
                                                                         capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "tensorboardX") else real(name, *a))
    out = tmp_path / "run"
    assert cli.main(["train", "--report-to", names, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_report_to_is_refused_outside_sync_mode(capsys, tmp_path):
    assert cli.main(["train", "--mode", "async", "--report-to", "tensorboard", "--out", str(tmp_path / "r")]) == 2
    assert "--report-to works only with --mode sync" in capsys.readouterr().err


def test_report_to_and_timeline_from_a_config_file(tmp_path):
    from distbp import config as cfg
    from distbp import options

    path = tmp_path / "run.toml"
    path.write_text('report-to = ["tensorboard", "mlflow"]\ntimeline = true\n')
    config = options.from_args(cli.build_parser().parse_args(["train", "--config", str(path)]))
    assert config.reporters() == ("tensorboard", "mlflow") and config.timeline is True
    path.write_text('timeline = "yes"\n')
    with pytest.raises(cfg.UsageError, match="timeline must be bool"):
        options.load_toml(str(path))
