"""--workers MIN:MAX: workers join and leave a run, and the weights stay the bits of a fixed-K run.

The cluster tests run scripts/elastic_demo.py --scenario: a real Ray cluster on 127.0.0.1
(``ray.cluster_utils.Cluster``: a head for the server, one-CPU worker nodes), token auth on
with a token of its own, and the run as its driver.  The script changes the cluster from a
step callback and waits until Ray shows the change, so "mid-run" does not hang on timing.
Each scenario runs in a process of its own session: when it has ended, the test checks that
no process of that session is left (every node it started is stopped).  The reference is a
fixed-K run of the same options on this session's local Ray.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env, family, step_lines, train_config

from distbp import Config, UsageError
from distbp.loops.sync import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "elastic_demo.py"
STEPS = 24
RUN = dict(layers="2,16,16,3", batch_size=60, micro_batch=8, optimizer="adam", steps=STEPS)  # as elastic_demo.RUN


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The same run with a fixed K = 2: its weights_sha256 and each step's summed-gradient hash."""
    summary = train(train_config(tmp_path_factory.mktemp("fixed"), workers=2, **RUN))
    return summary["weights_sha256"], [line["grad_xxh3"] for line in step_lines(Path(summary["out"]))]


@pytest.fixture(scope="module")
def fixed(reference):
    return reference[0]


def assert_fixed_k_steps(out: Path, reference) -> None:
    """Steps 1..STEPS once each, every one the same summed gradient as the fixed-K run's."""
    lines = step_lines(out)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert [line["grad_xxh3"] for line in lines] == reference[1]


def scenario(name: str, out: Path) -> dict:
    """Run one scenario in a session of its own; check that it left no process behind."""
    proc = subprocess.Popen([sys.executable, str(DEMO), "--scenario", name, "--steps", str(STEPS), "--out", str(out),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    left = family({proc.pid})
    assert not left, f"processes of the scenario's cluster survived it: {left}"
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.cluster
def test_nodes_joining_mid_run_add_workers_and_keep_the_bits(fixed, reference, tmp_path):
    result = scenario("grow", tmp_path / "run")
    counts = result["workers_per_step"]
    assert counts[:3] == [1, 1, 1]  # one worker node: one worker
    assert counts[-1] == 3 and max(counts) == 3  # two nodes joined after step 3: three
    assert counts == sorted(counts)
    resizes = result["summary"]["resizes"]
    assert [(r["from"], r["to"]) for r in resizes] in ([(1, 3)], [(1, 2), (2, 3)]), resizes
    assert all(r["step"] > 3 and "started" in r["why"] for r in resizes)
    assert_fixed_k_steps(tmp_path / "run", reference)  # no step lost or redone, each the same sum
    assert result["summary"]["transport"] == "direct"  # workers on several nodes
    assert result["summary"]["weights_sha256"] == fixed


@pytest.mark.cluster
def test_a_node_killed_mid_run_leaves_fewer_workers_and_the_same_bits(fixed, reference, tmp_path):
    result = scenario("shrink", tmp_path / "run")
    counts = result["workers_per_step"]
    assert max(counts[:4]) == 3  # three worker nodes, waited for after step 1
    assert all(c == 2 for c in counts[-STEPS // 2:])  # one node killed after step 3: two from then on
    losses = [r for r in result["summary"]["resizes"] if r["to"] < r["from"]]
    assert len(losses) == 1 and (losses[0]["from"], losses[0]["to"]) == (3, 2) and "lost" in losses[0]["why"]
    assert losses[0]["step"] > 3
    assert_fixed_k_steps(tmp_path / "run", reference)
    assert result["summary"]["weights_sha256"] == fixed


@pytest.mark.cluster
def test_below_min_the_run_waits_stops_with_a_checkpoint_and_resumes_to_the_same_bits(fixed, reference, tmp_path):
    out = tmp_path / "run"
    result = scenario("below-min", out)
    stopped = result["stopped"]  # the one line the CLI prints after "distbp: error: "
    assert "\n" not in stopped and "after waiting 2 s (--elastic-timeout)" in stopped
    assert f"continue with: distbp train --resume {out}" in stopped
    step = int(stopped.split("(step ")[1].split(")")[0])
    assert 3 < step < STEPS and f"stopped before step {step + 1}:" in stopped
    assert result["workers_per_step"][:3] == [2, 2, 2] and len(result["workers_per_step"]) == step
    resumed = result["resumed"]  # `distbp train --resume` once a node joined again
    assert resumed["returncode"] == 0, resumed["stderr_tail"]
    assert resumed["weights_sha256"] == fixed
    assert_fixed_k_steps(out, reference)


# ------------------------------------------------------------------ one machine, no cluster

def test_workers_option_forms():
    for value, want in [(3, (3, 3, 3)), ("3", (3, 3, 3)), ("2:2", (2, 2, 2)), ("1:4", ("1:4", 1, 4)),
                        (" 1 : 4 ", ("1:4", 1, 4))]:
        config = Config(workers=value)
        config.validate()
        assert (config.workers, config.min_workers, config.max_workers) == want
    for bad, words in [("0", "at least 1"), ("3:1", "MAX must be at least MIN"), ("1:x", "K or MIN:MAX"),
                       ("1:2:3", "K or MIN:MAX"), ("", "K or MIN:MAX"), ("0:2", "at least 1")]:
        with pytest.raises(UsageError, match=words):
            Config(workers=bad).validate()
    with pytest.raises(UsageError, match="only with --mode sync"):
        Config(workers="1:2", mode="async").validate()
    with pytest.raises(UsageError, match="--elastic-timeout"):
        Config(elastic_timeout=-1.0).validate()


def test_cli_and_toml_take_a_range(tmp_path):
    from distbp import options
    from distbp.cli import build_parser

    ns = build_parser().parse_args(["train", "--workers", "2:5", "--elastic-timeout", "7"])
    config = options.from_args(ns)
    assert (config.workers, config.elastic_timeout) == ("2:5", 7.0)
    path = tmp_path / "run.toml"
    path.write_text('workers = "1:3"\n')
    assert options.load_toml(str(path)) == {"workers": "1:3"}
    path.write_text("workers = 4\n")
    assert options.load_toml(str(path)) == {"workers": 4}
    from distbp.api import _config  # distbp.fit's keywords

    assert _config({"workers": "1:3"}).workers == "1:3" and _config({"workers": 3}).workers == 3
    with pytest.raises(UsageError, match="workers must be int"):  # a K is a number; only a range is text
        _config({"workers": "3"})


def test_a_range_on_one_machine_gives_the_fixed_k_bits(fixed, tmp_path):
    """--workers 1:3 on the local Ray: it starts with the first worker up, takes in the others
    as they come (how soon is timing), and ends with the fixed-K bits."""
    summary = train(train_config(tmp_path, workers="1:3", **RUN))
    counts = [line["workers"] for line in step_lines(Path(summary["out"]))]
    assert summary["weights_sha256"] == fixed
    assert summary["workers"] == "1:3" and summary["transport"] == "direct"
    assert all(1 <= c <= 3 for c in counts) and counts == sorted(counts)  # nothing lost here: it only grows
    assert all(r["to"] > r["from"] for r in summary["resizes"])
    assert len(summary["worker_nodes"]) >= max(counts)


def test_fixed_k_logs_k_workers_per_step_and_no_resize(ray_session, tmp_path):
    summary = train(train_config(tmp_path, workers=2, steps=4))
    assert summary["resizes"] == []
    assert [line["workers"] for line in step_lines(Path(summary["out"]))] == [2, 2, 2, 2]
