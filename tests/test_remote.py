"""--out/--resume as URLs, against a real S3 API: moto's server on 127.0.0.1 (no mock of fsspec).

A run to s3://bucket/run leaves its files there (and nothing staged locally), a resume from the
URL ends with the weights of an uninterrupted local run, and at every step what the bucket holds
is a run that can be resumed: a checkpoint only with the metrics that reach it, the summary last.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import distbp
from distbp import cli
from distbp.data.datasets import spirals
from distbp.run import remote

NEEDS = 's3fs and moto serve S3 here: pip install -e ".[dev]"'
pytest.importorskip("s3fs", reason=NEEDS)
pytest.importorskip("moto", reason=NEEDS)

OPTIONS = ["--layers", "2,16,3", "--batch-size", "60", "--micro-batch", "8", "--checkpoint-every", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1, stopped by its pid at the end; yields its endpoint URL."""
    port = free_port()
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """The standard AWS environment pointing at the server, a fresh bucket, and an s3fs client."""
    import s3fs

    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(remote, "STAGING", str(tmp_path / "staging"))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"b{len(fs.ls(''))}-{os.getpid()}"
    fs.mkdir(bucket)
    fs.bucket = bucket
    return fs


def staged(tmp_path) -> list:
    folder = tmp_path / "staging"
    return os.listdir(folder) if folder.exists() else []


def test_a_run_to_s3_and_a_resume_from_it_give_the_weights_of_a_local_run(ray_session, s3, tmp_path, capsys):
    url = f"s3://{s3.bucket}/runs/a"
    assert cli.main(["train", *OPTIONS, "--steps", "8", "--timeline", "--out", url]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["out"] == url
    keys = sorted(k.removeprefix(f"{s3.bucket}/runs/a/") for k in s3.find(f"{s3.bucket}/runs/a"))
    assert keys == ["checkpoint.npz", "metrics.jsonl", "summary.json", "timeline.jsonl"]
    summary = json.loads(s3.cat(f"{s3.bucket}/runs/a/summary.json"))
    assert summary["weights_sha256"] == first["weights_sha256"] and summary["config"]["out"] == url
    lines = s3.cat(f"{s3.bucket}/runs/a/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    assert staged(tmp_path) == []  # everything is at the URL: the staging directory is gone
    assert cli.main(["train", "--resume", url, "--steps", "12", "--lr", "0.5"]) == 2  # not resumable
    assert "--lr 0.5 differs" in capsys.readouterr().err and staged(tmp_path) == []

    assert cli.main(["train", "--resume", url, "--steps", "12", "--workers", "3"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert cli.main(["train", *OPTIONS, "--steps", "12", "--workers", "1", "--out", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    assert resumed["weights_sha256"] == local["weights_sha256"]
    assert json.loads(s3.cat(f"{s3.bucket}/runs/a/summary.json"))["steps"] == 12
    lines = s3.cat(f"{s3.bucket}/runs/a/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))
    assert staged(tmp_path) == []


def test_what_the_bucket_holds_is_resumable_at_every_step(ray_session, s3, tmp_path):
    """Looked at after each step (from a callback): a checkpoint only with metrics.jsonl reaching its
    step, no summary.json before the end; fit returns a Result read back from the URL."""
    url = f"s3://{s3.bucket}/fit"
    root = f"{s3.bucket}/fit"
    seen = []

    class LookAtTheBucket(distbp.Callback):
        def on_step(self, record):
            assert not s3.exists(f"{root}/summary.json")
            if s3.exists(f"{root}/checkpoint.npz"):
                s3.get_file(f"{root}/checkpoint.npz", str(tmp_path / "c.npz"))
                with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
                    step = int(z["step"])
                logged = [json.loads(x)["step"] for x in s3.cat(f"{root}/metrics.jsonl").decode().splitlines()]
                assert max(logged) >= step
                seen.append(step)

    data = spirals()
    result = distbp.fit(data.X, data.y, layers=[2, 16, 3], workers=2, batch_size=60, micro_batch=8, steps=10,
                        checkpoint_every=3, out=url, callbacks=[LookAtTheBucket()])
    assert seen and sorted(set(seen)) == [3, 6, 9]
    assert result.path == url and result.summary["out"] == url and result.summary["steps"] == 10
    assert result.summary["weights_sha256"] == distbp.Result.from_path(url).summary["weights_sha256"]
    assert staged(tmp_path) == []


@pytest.mark.parametrize("case", ["not-empty", "no-bucket", "no-checkpoint", "no-s3fs", "bad-layers"])
def test_bad_urls_are_one_line_and_create_nothing(case, s3, tmp_path, monkeypatch, capsys):
    if case == "not-empty":
        s3.pipe(f"{s3.bucket}/taken/metrics.jsonl", b"")
    argv = {"not-empty": ["--out", f"s3://{s3.bucket}/taken"], "no-bucket": ["--out", "s3://no-such-bucket/run"],
            "no-checkpoint": ["--resume", f"s3://{s3.bucket}/empty"], "no-s3fs": ["--out", f"s3://{s3.bucket}/x"],
            "bad-layers": ["--out", f"s3://{s3.bucket}/y", "--layers", "5,3"]}  # found once the data is loaded
    if case == "no-s3fs":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "s3fs" else real(name, *a))
    before = sorted(s3.find(s3.bucket))
    assert cli.main(["train", *argv[case]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distbp: error: ")
    assert {"not-empty": "already exists and is not empty", "no-bucket": "cannot write there",
            "no-checkpoint": "no checkpoint.npz", "no-s3fs": 'pip install -e ".[s3]"',
            "bad-layers": "--layers starts with 5 inputs"}[case] in err
    assert sorted(s3.find(s3.bucket)) == before and staged(tmp_path) == []


def test_keep_checkpoints_at_a_url_keeps_the_same_files_as_a_local_run(ray_session, s3, tmp_path, capsys):
    """--keep-checkpoints 2: the URL ends with the checkpoints a local run keeps, the pruned ones removed there too."""
    url = f"s3://{s3.bucket}/runs/kept"
    local = str(tmp_path / "local")
    argv = [*OPTIONS, "--steps", "16", "--keep-checkpoints", "2"]
    assert cli.main(["train", *argv, "--out", url]) == 0
    assert cli.main(["train", *argv, "--out", local]) == 0
    capsys.readouterr()
    at_url = sorted(os.path.basename(p) for p in s3.ls(f"{s3.bucket}/runs/kept") if "checkpoint" in p)
    here = sorted(name for name in os.listdir(local) if "checkpoint" in name)
    assert at_url == here == ["checkpoint-12.npz", "checkpoint-16.npz", "checkpoint.npz"]


def test_a_run_to_a_url_that_stops_names_its_checkpoint_at_the_url(ray_session, s3, tmp_path, capsys):
    """A run that ends with an error after a checkpoint (here: it diverges) names the checkpoint
    where the user finds it, at the URL, not in the staging directory, which is gone."""
    url = f"s3://{s3.bucket}/runs/diverged"
    code = cli.main(["train", "--layers", "2,16,3", "--loss", "squared", "--activation", "identity",
                     "--optimizer", "sgd", "--lr", "100", "--reduction", "sum", "--dtype", "float32",
                     "--batch-size", "60", "--micro-batch", "8", "--steps", "40", "--checkpoint-every", "2",
                     "--out", url])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("distbp: error: training diverged at step ")
    assert f"the last good checkpoint is {url}/checkpoint.npz (step " in last
    assert s3.exists(f"{s3.bucket}/runs/diverged/checkpoint.npz")
    assert staged(tmp_path) == []
