"""Connecting to Ray and placing the actors: the only place that knows about clusters.

Locally we start Ray bound to 127.0.0.1 with no dashboard.  On a cluster (``--address
auto`` or ``RAY_ADDRESS``) the workers go into a placement group with the SPREAD strategy,
so K workers land on as many nodes as the cluster offers.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .errors import UsageError

PLACEMENT_TIMEOUT_S = 60


def connect(address: str | None, cpus_wanted: int) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a local Ray.  True when we started it."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.ERROR, log_to_driver=True, configure_logging=True)
    if address in (None, "local"):
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus_wanted), include_dashboard=False,
                 _node_ip_address="127.0.0.1", **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--address {address}: cannot connect to Ray ({str(exc).splitlines()[0]})") from None
    return False


def place(bundles: int):
    """A placement group of ``bundles`` one-CPU bundles spread over the nodes, once it is ready."""
    pg = placement_group([{"CPU": 1}] * bundles, strategy="SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        total = ray.cluster_resources().get("CPU", 0)
        raise UsageError(f"the Ray cluster cannot place {bundles} one-CPU actors within "
                         f"{PLACEMENT_TIMEOUT_S} s (it has {total:g} CPUs); use fewer --workers")
    return pg


def in_bundle(pg, index: int) -> dict:
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index)}
