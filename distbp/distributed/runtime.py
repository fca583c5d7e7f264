"""Connecting to Ray and placing the actors: the only place that knows about clusters.

Locally we start Ray bound to 127.0.0.1 with no dashboard.  On a cluster (``--address
auto`` or ``RAY_ADDRESS``) the workers go into a placement group with the SPREAD strategy,
so K workers land on as many nodes as the cluster offers.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.exceptions import AuthenticationError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import UsageError

PLACEMENT_TIMEOUT_S = 60


def connect(address: str | None, cpus_wanted: int) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a local Ray.  True when we started it."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return False
    if address not in (None, "local"):
        probe(address)
    quiet = dict(logging_level=logging.ERROR, log_to_driver=True, configure_logging=True)
    if address in (None, "local"):
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus_wanted), include_dashboard=False,
                 _node_ip_address="127.0.0.1", **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except AuthenticationError:  # a RayError, none of the three below
        raise auth_error(address, address) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--address {address}: cannot connect to Ray ({str(exc).splitlines()[0]})") from None
    return False


def auth_error(address: str, target: str, missing: AuthenticationError | None = None) -> UsageError:
    """The one line for a cluster that refuses us, naming what to set.

    ``missing`` is Ray's error when no token could be loaded at all; its first sentence says
    which source failed (e.g. that RAY_AUTH_TOKEN_PATH names a missing file).
    """
    fix = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token"
    if missing is not None:
        reason = str(missing).splitlines()[0].split(". ")[0].rstrip(".")
        return UsageError(f"--address {address}: no Ray auth token ({reason}); {fix}")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return UsageError(f"--address {address}: the Ray cluster at {target} requires token authentication; {fix}")
    return UsageError(f"--address {address}: the Ray cluster at {target} refused our token; {fix}")


PROBE_TIMEOUT_S = 5


def probe(address: str) -> None:
    """UsageError within seconds unless a Ray cluster answers at ``address`` and accepts our token.

    ``ray.init`` retries a wrong token for about 20 s, printing a warning each second, and an
    address where nothing answers for longer.  One call to the cluster's GCS with a deadline,
    over the channel Ray itself would use (with the token when token auth is on), tells the
    same in a second.  Addresses other than ``auto`` and ``host:port`` are left to ``ray.init``.
    """
    import grpc

    try:  # Ray's own address lookup and GCS channel: private, so fall through to ray.init if they move
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        from ray._private.grpc_utils import init_grpc_channel
        from ray._private.services import canonicalize_bootstrap_address_or_die
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return
    target = address
    if address == "auto":
        # As ray.init does for "auto", minus its log line saying so: the error below is the only line.
        setup_log = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
        level = setup_log.level
        setup_log.setLevel(logging.ERROR)
        try:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        finally:
            setup_log.setLevel(level)
        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise UsageError("--address auto: no running Ray cluster found on this machine "
                             "(start one with `ray start --head`, or give its address)") from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or "/" in target:
        return
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(init_grpc_channel(target))
    try:
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S)
    except AuthenticationError as exc:  # RAY_AUTH_MODE=token but no token found: raised before sending
        raise auth_error(address, target, exc) from None
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise auth_error(address, target) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise UsageError(f"--address {address}: no Ray cluster answers at {target}") from None
        raise UsageError(f"--address {address}: {target} does not answer as a Ray cluster ({code.name})") from None


def place(bundles: int):
    """A placement group of ``bundles`` one-CPU bundles spread over the nodes, once it is ready.

    Ray's SPREAD gives the first bundles distinct nodes as long as there are unused nodes with
    a free CPU, then fills the least loaded ones: put the actors to spread most first.
    """
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
