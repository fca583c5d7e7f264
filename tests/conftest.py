"""Shared fixtures: one local Ray for the whole test session (ray.init costs ~3 s)."""

import os

import pytest

from distbp.distributed.loopback import keep_local_ray_on_loopback

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
