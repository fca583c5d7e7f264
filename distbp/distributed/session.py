"""The Ray side of one run, set up and torn down in one place.

``Session`` connects to Ray (or starts a private local one), places one placement group of
K worker and S server bundles, picks the transport of the step's vectors (shared memory
when every bundle and the driver share one node, else authenticated sockets; ``--transport``), puts the training
data in the object store once, and starts the actors.  Closing it removes exactly what it
made: the placement group, the shared files, and Ray itself if it started it.  The sync
loop, the async loop and scripts/bench.py all run on it.

Workers take bundles 0..K-1 and the servers K..K+S-1: SPREAD gives the first bundles distinct
nodes, so K workers land on min(K, nodes) nodes (servers first could leave two workers on
one node of a 2-node cluster: 6 of 15 placement groups, measured).
"""

from __future__ import annotations

import numpy as np
import ray
from ray.util.placement_group import placement_group_table, remove_placement_group

from ..config import Config
from ..data.problem import Problem
from ..errors import UsageError
from ..lecture.network import Layout
from ..lecture.optim import Hyper
from ..run import signals
from . import cores
from .actors import ParameterServer, Worker
from .runtime import connect, disconnect, in_bundle, place
from .servers import Servers
from .transport import Transport, choose
from .workers import WorkerPool


class Session:
    """Ray connected, the actors' bundles placed, the data in the object store: ``spawn_*`` start actors."""

    def __init__(self, config: Config, problem: Problem, servers: int, shared_memory: bool = True):
        """``shared_memory=False`` keeps the vectors in the object store even on one node (the
        async loop: its workers read whatever weights the server holds, mid-update or not)."""
        self.config, self.problem = config, problem
        self.layers, self.dtype = problem.layers, np.dtype(config.dtype)
        self.workers, self.servers = config.workers, servers
        self.started_ray, self.pg, self.transport = False, None, None
        try:
            users_ray = ray.is_initialized()  # started in this process by the caller (distbp.fit)
            self.started_ray = connect(config.address, cpus_wanted=self.workers + servers)
            if users_ray:
                self._check_fits()
            self.pg = place(self.workers + servers)
            self.transport = self._transport(shared_memory)
            self.threads = config.threads_per_worker or cores.share(self.pg, self.workers)
            self.transport_name = self.transport.name  # for the summary, after close
            self.X, self.Y = ray.put(problem.X), ray.put(problem.Y)
        except BaseException:
            self.close()
            raise

    def _check_fits(self) -> None:
        """UsageError at once, instead of waiting for a placement that cannot happen, when the
        Ray this process already runs has fewer CPUs than the run has actors."""
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < self.workers + self.servers:
            raise UsageError(f"the Ray running in this process has {cpus:g} CPUs but the run needs "
                             f"{self.workers + self.servers} one-CPU actors ({self.workers} workers + "
                             f"{self.servers} servers): use fewer workers, or ray.init(num_cpus=...) with more")

    def _transport(self, shared_memory: bool) -> Transport:
        size = Layout(self.layers).size
        here = ray.get_runtime_context().get_node_id()
        nodes = set(placement_group_table(self.pg)["bundles_to_node_id"].values())
        return choose(self.config.transport if shared_memory else "object-store", nodes == {here}, size,
                      self.dtype, self.servers)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_servers(self, weights: np.ndarray) -> Servers:
        """The S server actors, starting from ``weights`` (the whole flat vector)."""
        config = self.config
        hyper = Hyper(config.optimizer, config.momentum, config.weight_decay)
        mask = ray.put(Layout(self.layers).bias_mask(self.dtype))
        start = ray.put(weights)  # once, however many servers read it
        return Servers(lambda s: ParameterServer.options(**in_bundle(self.pg, self.workers + s)).remote(
            s, start, hyper, mask, self.transport), self.transport.bounds)

    def start_workers(self) -> WorkerPool:
        """The K worker actors, each in its bundle, replaced there when one dies."""
        config = self.config
        return WorkerPool(lambda k: Worker.options(**in_bundle(self.pg, k)).remote(
            self.layers, config.activation, config.loss, self.dtype, self.X, self.Y, config.micro_batch,
            self.transport, self.threads), self.workers)

    def close(self) -> None:
        """Remove what the session made; safe to call twice.  A stop signal waits for the end
        of it (signals.shielded): cut in the middle, it would leave Ray or the shared files."""
        with signals.shielded():
            try:
                if self.pg is not None:
                    pg, self.pg = self.pg, None
                    remove_placement_group(pg)
            finally:
                try:
                    if self.started_ray:
                        self.started_ray = False
                        disconnect()
                finally:
                    if self.transport is not None:
                        transport, self.transport = self.transport, None
                        transport.close()
