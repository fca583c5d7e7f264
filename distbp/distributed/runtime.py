"""Connecting to Ray and placing the actors: the only place that knows about clusters.

Locally we start Ray bound to 127.0.0.1 with no dashboard.  On a cluster (``--address
auto`` or ``RAY_ADDRESS``) the servers go into a placement group with the SPREAD strategy
(``place``); the workers are placed one by one with the same strategy (session.py).

A local Ray we start is ours to end, however the driver ends.  Its GCS and raylet die with the
driver (Ray starts them with a parent-death signal), but the raylet's two agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) then spend 60 s trying to tell the dead GCS
that the raylet died before they exit; Ray 2.60 always starts them (the raylet refuses an
empty agent command) and has no setting for that wait.  So a small reaper process, started
with the local Ray, waits for the driver to go (its stdin reaches end of file when the driver
exits, by SIGKILL too) and then kills what is left of that Ray.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys

import ray
from ray.exceptions import AuthenticationError, OutOfMemoryError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import UsageError
from ..run import signals

PLACEMENT_TIMEOUT_S = 60
# An actor gone: it died (RayActorError), or Ray's memory monitor killed the process that ran
# the call (OutOfMemoryError, which is no RayActorError): the same loss, handled the same way.
ACTOR_LOST = (RayActorError, OutOfMemoryError)
MARKER = "DISTBP_LOCAL_RAY"  # environment variable naming the local Ray a driver started

# The reaper: argv = the marker entry, the driver's pid.  Which processes are that Ray's: those
# that carry the marker in their environment (inherited from the driver: the GCS, the raylet,
# the workers) and everything below them.  The agents' environment, as /proc shows it, is
# overwritten by their process title, so they are known as the raylet's children: the reaper
# looks at the process tree while the driver runs (often at first, then every few seconds),
# and remembers each process with its start time (a pid used again is not the same process).
# It ignores the signals a terminal or a service manager sends the driver's group, so that it
# outlives the driver long enough to clean up; it exits once it has.
REAPER = r"""
import os, select, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
mark, driver, me = sys.argv[1].encode(), sys.argv[2], str(os.getpid())

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state, ppid, *rest = fh.read().rsplit(b")", 1)[1].split()
        return None if state == b"Z" else (ppid.decode(), rest[17])
    except (OSError, IndexError, ValueError):
        return None

def marked(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return mark in fh.read().split(b"\0")
    except OSError:
        return False

def pids():
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and pid not in (me, driver)]

family = {}
def look():
    table = {pid: st for pid in pids() if (st := stat(pid))}
    kids = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    todo = [pid for pid in kids.get(driver, []) if marked(pid)]
    while todo:
        pid = todo.pop()
        family.setdefault(pid, table[pid][1])
        todo += kids.get(pid, [])

wait = 0.25
while True:
    if select.select([0], [], [], wait)[0] and not os.read(0, 4096):
        break
    look()
    wait = min(wait * 1.5, 5.0)
for _ in range(5):
    left = [pid for pid, start in family.items() if (stat(pid) or (0, 0))[1] == start]
    left += [pid for pid in pids() if pid not in family and stat(pid) and marked(pid)]
    for pid in left:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    if not left:
        break
    time.sleep(0.2)
"""

_reaper: subprocess.Popen | None = None


def check_address(address: str, given: str) -> None:
    """UsageError at once for an address ``connect`` cannot use; ``given`` names where it came from.

    ``auto`` and ``local`` aside, an address is a GCS's ``host:port``.  A Ray Client address
    (``ray://``) would make ``ray.init`` try for 30 s and warn; our actors and the object store
    references a step passes need a driver on the cluster instead.
    """
    if address in ("auto", "local"):
        return
    if address.startswith("ray://"):
        raise UsageError(f"{given}: Ray Client addresses (ray://) are not supported; give the cluster's GCS "
                         "address (host:6379), or run distbp on the cluster with `ray job submit`")
    if "://" in address:
        raise UsageError(f"{given}: not a Ray address; give the cluster's GCS address as host:port (e.g. host:6379)")
    host, colon, port = address.rpartition(":")
    ipv6 = host.startswith("[") and host.endswith("]")  # [::1]:6379, as Ray writes it
    if not colon or not host.strip("[]") or any(c.isspace() for c in host) or (":" in host and not ipv6):
        raise UsageError(f"{given}: not a Ray address; give host:port (e.g. 10.0.0.5:6379), auto or local")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        what = "the port is missing" if not port else f"the port {port!r} is not a number from 1 to 65535"
        raise UsageError(f"{given}: {what}; give host:port (e.g. {host}:6379)")


def connect(address: str | None, cpus_wanted: int) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a local Ray.  True when we started it."""
    given = f"--address {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return False
    if address not in (None, "local"):
        check_address(address, given)
        probe(address, given)
    quiet = dict(logging_level=logging.ERROR, log_to_driver=True, configure_logging=True)
    if address in (None, "local"):
        # address="local": a new Ray even when a cluster on this machine left its address in
        # Ray's temp dir (ray.init() with no address would join that one instead)
        _init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_wanted), include_dashboard=False,
              _node_ip_address="127.0.0.1", local=True, **quiet)
        return True
    try:
        _init(address=address, **quiet)
    except AuthenticationError:  # a RayError, none of the three below
        raise auth_error(given, address) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"{given}: cannot connect to Ray ({str(exc).splitlines()[0]})") from None
    return False


def _init(local: bool = False, **options) -> None:
    """``ray.init``, without its side effects on the driver's signal handling.

    ``ray.init`` installs a SIGTERM handler of its own, ``sys.exit(15)``: exit status 15 and no
    line, raised wherever the main thread is, ``ray.init`` included (whose C++ core was then
    left hung, or crashing at exit); and Ray's C++ core installs a crash handler that prints a
    stack dump for a SIGTERM.  The C++ one is not installed in this process (worker processes
    keep theirs).  When the caller has chosen a SIGTERM handler (the command has: see
    run/signals.py), Ray's is not installed either, ``ray.init`` is not cut in the middle by a
    stop (it waits for its end: ``shielded``, then Ray is shut down whole), and the caller's
    handlers are as they were afterwards.
    """
    before = signals.handlers()
    chosen = callable(before[signal.SIGTERM])
    undo = _keep_ray_off_signals(chosen)
    if local:
        _start_reaper()
    try:
        try:
            with signals.shielded():
                ray.init(**options)
        finally:
            undo()
            if local:
                os.environ.pop(MARKER, None)  # the Ray processes have it; anything the caller starts later must not
            signals.restore_after(before)
    except BaseException as exc:
        with signals.shielded():  # the command's handler stops at once when this is done
            try:
                if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM and chosen:
                    before[signal.SIGTERM](signal.SIGTERM, None)  # Ray's handler had it after all
            finally:
                if local:  # what a start cut short left running is garbage: the reaper clears it now
                    try:
                        if ray.is_initialized():
                            ray.shutdown()
                    finally:
                        stop_reaper()
        raise


def _keep_ray_off_signals(sigterm_chosen: bool):
    """Turn off Ray's C++ crash handler for this process, and Ray's SIGTERM handler while
    ``ray.init`` runs if the caller chose one; returns what puts the latter back.  Both are
    private to Ray: if they move, the dump (or status 15) comes back, nothing worse."""
    try:
        from ray._private import ray_constants
        from ray._private import utils as ray_utils
    except ImportError:
        return lambda: None
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    own = getattr(ray_utils, "set_sigterm_handler", None)
    if not sigterm_chosen or own is None:
        return lambda: None
    ray_utils.set_sigterm_handler = lambda handler: None

    def undo() -> None:
        ray_utils.set_sigterm_handler = own
    return undo


def _start_reaper() -> None:
    """Start the reaper and put its marker in the environment the local Ray will inherit."""
    global _reaper
    stop_reaper()
    marker = f"{MARKER}={os.getpid()}-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    try:
        _reaper = subprocess.Popen([sys.executable, "-I", "-S", "-c", REAPER, marker, str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    except OSError:  # no reaper: leftovers after a killed driver linger, nothing worse
        return
    os.environ[MARKER] = marker.split("=", 1)[1]


def stop_reaper() -> None:
    """Let the reaper clear what remains of the local Ray now, and wait for it (a fraction of a second)."""
    global _reaper
    reaper, _reaper = _reaper, None
    if reaper is None:
        return
    try:
        reaper.stdin.close()
        reaper.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pass


def disconnect() -> None:
    """End the local Ray that ``connect`` started (and anything of it left over)."""
    try:
        ray.shutdown()
    finally:
        stop_reaper()


def auth_error(given: str, target: str, missing: AuthenticationError | None = None) -> UsageError:
    """The one line for a cluster that refuses us, naming what to set; ``given`` names the address
    as the user gave it (``--address X`` or ``RAY_ADDRESS=X``).

    ``missing`` is Ray's error when no token could be loaded at all; its first sentence says
    which source failed (e.g. that RAY_AUTH_TOKEN_PATH names a missing file).
    """
    fix = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token"
    if missing is not None:
        reason = str(missing).splitlines()[0].split(". ")[0].rstrip(".")
        return UsageError(f"{given}: no Ray auth token ({reason}); {fix}")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return UsageError(f"{given}: the Ray cluster at {target} requires token authentication; {fix}")
    return UsageError(f"{given}: the Ray cluster at {target} refused our token; {fix}")


PROBE_TIMEOUT_S = 5


def probe(address: str, given: str | None = None) -> None:
    """UsageError within seconds unless a Ray cluster answers at ``address`` and accepts our token;
    the message names the address as ``given`` (default ``--address ADDRESS``).

    ``ray.init`` retries a wrong token for about 20 s, printing a warning each second, and an
    address where nothing answers for longer.  One call to the cluster's GCS with a deadline,
    over the channel Ray itself would use (with the token when token auth is on), tells the
    same in a second.  Addresses other than ``auto`` and ``host:port`` are left to ``ray.init``.
    """
    import grpc

    given = given or f"--address {address}"
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
            raise UsageError(f"{given}: no running Ray cluster found on this machine "
                             "(start one with `ray start --head`, or give its address)") from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or "/" in target:
        return
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(init_grpc_channel(target))
    try:
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S)
    except AuthenticationError as exc:  # RAY_AUTH_MODE=token but no token found: raised before sending
        raise auth_error(given, target, exc) from None
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise auth_error(given, target) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise UsageError(f"{given}: no Ray cluster answers at {target}") from None
        raise UsageError(f"{given}: {target} does not answer as a Ray cluster ({code.name})") from None


def place(bundles: int, what: str = "workers", resource: str | None = None):
    """A placement group of ``bundles`` one-CPU bundles spread over the nodes, once it is ready;
    ``what`` names the option to lower if it cannot be placed; ``resource``: each bundle also
    takes one unit of that custom resource (``--server-resource``), so only nodes offering it hold them.

    Ray's SPREAD gives the first bundles distinct nodes as long as there are unused nodes with
    a free CPU, then fills the least loaded ones: put the actors to spread most first.
    """
    pg = placement_group([{"CPU": 1, **({resource: 1} if resource else {})}] * bundles, strategy="SPREAD")
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        total = ray.cluster_resources().get("CPU", 0)
        where, offered = (f" on {resource} nodes", f" and {ray.cluster_resources().get(resource, 0):g} {resource}") \
            if resource else ("", "")
        raise UsageError(f"the Ray cluster cannot place {bundles} one-CPU actors{where} within "
                         f"{PLACEMENT_TIMEOUT_S} s (it has {total:g} CPUs{offered}); use fewer --{what}")
    return pg


def in_bundle(pg, index: int) -> dict:
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index)}
