"""The Ray side of one run, set up and torn down in one place.

``Session`` connects to Ray (or starts a private local one), places the S servers in a
placement group of their own (a fixed placement: a lost server restarts in its bundle),
makes the transport of the step's vectors (``--transport``: transport.choose), puts the
training data in the object store once, and starts the actors.  Workers are not in that
group: each is placed on its own, so that workers can come and go with the cluster's nodes
(workers.py, docs/elastic.md).  Closing it removes exactly what it made: the actors, the
placement group, and Ray itself if it started it.  The sync loop, the async loop and
scripts/bench.py all run on it.  Each worker reserves ``--threads-per-worker`` CPUs (cores.py).
"""

from __future__ import annotations

import numpy as np
import ray
from ray.util.placement_group import remove_placement_group

from ..config import AUTO, Config
from ..data.problem import Problem
from ..errors import UsageError
from ..lecture.network import Layout
from ..lecture.optim import Hyper
from ..run import signals
from . import cores
from .actors import ParameterServer, Worker
from .direct import peer_wait
from .runtime import PLACEMENT_TIMEOUT_S, connect, disconnect, in_bundle, place
from .servers import Servers
from .transport import choose
from .workers import WorkerPool


class Session:
    """Ray connected, the servers' bundles placed, the data in the object store: ``start_*`` start actors."""

    def __init__(self, config: Config, problem: Problem, servers: int | str, transport: str | None = None):
        """``servers``: S, or ``auto`` (``cores.servers_per_node``: the number is ``self.servers``
        then).  ``transport``: the --transport to use instead of the config's (the async loop:
        ``object-store``, its workers read whatever weights the server holds, mid-update or not)."""
        self.config, self.problem = config, problem
        self.layers, self.dtype = problem.layers, np.dtype(config.dtype)
        self.minimum, self.slots = config.min_workers, config.max_workers
        self.started_ray, self.pg, self.transport, self.pool = False, None, None, None
        try:
            users_ray = ray.is_initialized()  # started in this process by the caller (distbp.fit)
            # T threads a worker, its CPUs reserved: known before a private local Ray starts (it
            # is this machine), else read off the cluster's nodes.
            guess = 1 if servers == AUTO else servers  # a private local Ray is one node: one server
            self.threads = config.threads_per_worker or cores.default(config.address, self.slots, guess)
            self.started_ray = connect(config.address, cpus_wanted=self.slots * (self.threads or 1) + guess)
            # auto: what the cluster has beyond MAX workers (an elastic run's slots come first)
            self.servers = cores.servers_per_node(self.slots * (self.threads or 1), config.server_resource) \
                if servers == AUTO else servers
            if self.threads is None:
                self.threads = cores.share(self.slots, self.servers)
            if users_ray:
                self._check_fits()
            self.pg = place(self.servers, "servers", config.server_resource)
            layout = Layout(self.layers)  # each server gets a slice of every layer (cuts.striped)
            self.transport = choose(transport or config.transport, layout.size, self.dtype, self.servers,
                                    peer_wait(config.elastic_timeout), layout.offsets)
            self.X, self.Y = ray.put(problem.X), ray.put(problem.Y)
        except BaseException:
            self.close()
            raise

    def _check_fits(self) -> None:
        """UsageError at once, instead of waiting for a placement that cannot happen, when the
        Ray this process already runs has fewer CPUs than the run has actors."""
        cpus = ray.cluster_resources().get("CPU", 0)
        need = self.minimum * self.threads + self.servers
        if cpus < need:
            raise UsageError(f"the Ray running in this process has {cpus:g} CPUs but the run needs {need} "
                             f"({self.minimum} workers of {self.threads} CPUs + {self.servers} one-CPU servers): "
                             "use fewer workers or --threads-per-worker, or ray.init(num_cpus=...) with more")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_servers(self, weights: np.ndarray) -> Servers:
        """The S server actors, starting from ``weights`` (the whole flat vector)."""
        config = self.config
        hyper = Hyper.of(config)
        mask = ray.put(Layout(self.layers).bias_mask(self.dtype))
        start = ray.put(weights)  # once, however many servers read it
        return Servers(lambda s: ParameterServer.options(**in_bundle(self.pg, s)).remote(
            s, start, hyper, mask, self.transport), self.transport.parts, config.elastic_timeout)

    def start_workers(self) -> WorkerPool:
        """MAX worker actors (``--workers MIN:MAX``), each placed on its own, once MIN are up;
        replaced when one dies, started whenever the cluster has a CPU for one."""
        config = self.config
        self.pool = WorkerPool(lambda k: Worker.options(num_cpus=self.threads, scheduling_strategy="SPREAD").remote(
            self.layers, config.activation, config.loss, self.dtype, self.X, self.Y, config.micro_batch,
            self.transport, self.threads), self.slots)
        if not self.pool.wait_started(self.minimum, PLACEMENT_TIMEOUT_S):
            total = ray.cluster_resources().get("CPU", 0)
            raise UsageError(f"the Ray cluster cannot place {self.minimum} worker actors of {self.threads} "
                             f"CPUs within {PLACEMENT_TIMEOUT_S} s (it has {total:g} CPUs, {self.servers} for the "
                             "servers); use fewer --workers or --threads-per-worker")
        return self.pool

    def close(self) -> None:
        """Remove what the session made; safe to call twice.  A stop signal waits for the end
        of it (signals.shielded): cut in the middle, it would leave Ray running."""
        with signals.shielded():
            try:
                if self.pool is not None:
                    pool, self.pool = self.pool, None
                    pool.close()
                if self.pg is not None:
                    pg, self.pg = self.pg, None
                    remove_placement_group(pg)
            finally:
                if self.started_ray:
                    self.started_ray = False
                    disconnect()
