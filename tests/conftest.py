"""Shared fixtures: one local Ray for the whole test session (ray.init costs ~3 s)."""

import os
import sys
from pathlib import Path

import pytest

from distbp.distributed.loopback import keep_local_ray_on_loopback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from localcluster import LocalCluster, clean_env, family  # noqa: E402, F401  (re-exported to the tests)

# Before any test module imports Ray: the session's Ray, and every local Ray a test starts,
# listen on 127.0.0.1 only.  (test_cluster.py gives its cluster's processes no RAY_* variable.)
keep_local_ray_on_loopback("local")

# Many tests place more actors than this machine has cores (K = 7 on 2 cores): logical CPUs.
RAY_CPUS = 16


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray on 127.0.0.1 shared by every test that needs one; distbp.train joins it."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", configure_logging=True)
    yield ray
    ray.shutdown()


def train_config(tmp_path, **overrides):
    """A small, fast Config writing into a fresh directory under tmp_path."""
    from distbp import Config

    values = dict(dataset="spirals", layers="2,16,16,3", workers=2, batch_size=60, micro_batch=8,
                  steps=5, out=str(tmp_path / f"run-{len(list(tmp_path.iterdir()))}"))
    values.update(overrides)
    config = Config(**values)
    config.validate()
    return config


def step_lines(run_dir) -> list[dict]:
    """The step records of a run's metrics.jsonl in step order (``metrics.steps``: evaluation lines
    left out); a step logged twice fails the test."""
    from distbp.run import metrics

    records = metrics.read(os.path.join(str(run_dir), metrics.NAME))
    steps = metrics.steps(records)
    assert len(steps) == sum("loss" in r for r in records), "a step's line was written twice"
    return steps


@pytest.fixture(scope="module")
def cluster():
    """A real 2-node Ray cluster on this machine (cluster/local_cluster.sh through
    scripts/localcluster.py, as scripts/bench.py --nodes 2 starts one): a head and one worker
    node of 3 logical CPUs each, token auth on, on free ports and in a state directory of its
    own.  Stopped with the script's ``down`` whatever happened; every process it started must be
    gone then (a test may have stopped it already: then that is a no-op)."""
    c = LocalCluster(workers=1, cpus=3)
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        assert not left, f"processes of the test cluster survived `down`: {left}"
