"""The direct transport: the per-step vectors between the actors themselves, not through Ray.

Each worker-server pair takes one of two ways, decided when they first meet: between nodes an
authenticated TCP connection (channel.py), within a node shared memory (a memfd of the actor
that owns the array, mapped by the other: shm.Memfds, nothing to clean up when an actor dies).
Only handles (an address, a key, a memfd's path) go through Ray.  Each server listens on its
Ray node's address and answers a worker's requests (direct_server.Requests):

- ``Reached(window, steps, pull)``: the weights after ``steps`` steps of window ``window``, as
  soon as the server starts updating them (or no, if the window ended before), streamed chunk
  by chunk straight into the worker's weight buffer; a worker of the server's node copies them
  from the server's memory instead, once they are all updated (with one server: reads them in
  place);
- ``Push(key, step, rows)``: ``rows`` rows of the server's columns of a step's node values
  under a key the driver chose, from the top column down as the worker's backward pass
  finishes each layer, then the micro-batches' errors, squared norms and compute time (its
  meta), filed in the server's inbox (inbox.py) as they come; a worker of the server's node
  computes into its own shared memory and sends only its handle (``Put``), then from which
  column on the values are done, as they are, then the meta.

The server's step waits for its keys (``collect``).  So only the bytes between nodes cross a
socket: with one server per node, what a reduce-scatter plus an all-gather would send.  The
driver never speaks this protocol: it calls a window off through Ray (``ParameterServer.ask(CallOff(w))``).
Every wait on a peer ends after ``Direct.wait_s``, from the run's --elastic-timeout: a server
that nobody calls off gives up by itself, and a worker whose server says nothing for twice
that long takes it for lost.  A late copy nobody waits for may pull weights while a server
updates them, or push after the step was taken: its result is dropped.

Within a window's step the bytes between nodes flow as in BytePS and DDP: a push goes piece by
piece (``PIECE_BYTES`` of every row at a time), each piece once the worker's backward pass has
finished the layers it holds, top layer first, while the layers below are computed; the server
sums each chunk of the gradient as soon as its pieces are in (``collect``'s ``ready``), from
the top, while the rest still arrives; and a pull of the weights after a step is answered as
soon as the server starts updating, chunk by chunk in the order of the vector (the order the
next forward pass reads them), each chunk the moment it holds its new weights
(``Board.updated``, ``Requests.reached``), while the worker's forward pass starts on layer 1 as
soon as layer 1's weights are in (arrival.py).  A server sends nothing of a step it refuses: it
checks the loss and the whole sum before it updates any chunk.

The parts, as ps-lite splits its van, its customer and its server: the wire (channel.py:
authenticated connections, messages and arrays), typed requests and replies (here, each a
dataclass the server dispatches on by type), the worker's end (direct_worker.py), the server's
end and its request handler (direct_server.py), the server's inbox of pushes (inbox.py) and
its board of which step it holds and which window it runs (board.py).

Failures keep the crew's meaning: a server that cannot be reached (it died, its node is
gone) makes the worker's call fail with ``PeerLost``, an ``ObjectLostError`` ("the step's
inputs are lost"), so the driver recovers the servers as it does when an object is lost; a
worker that dies mid-push leaves only a partial entry, which no step names and a later step
throws away; a worker of the server's node that dies after its call returned takes its
node values with it: the server's step then fails with the step's inputs lost, and the driver
redoes the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ray.exceptions import ObjectLostError

from ..lecture import cuts
from . import channel, shm

PIECE_BYTES = 1 << 20  # a push goes this many bytes of every row at a time
# An actor's wait on a peer (a worker's values, the weights after a step, a connection to a full
# listener) gives up after the run's --elastic-timeout, how long the run waits for missing
# workers (``peer_wait``), but never sooner than this: a window that gave up on every slow step
# would be tried again, and again.
WAIT_FLOOR_S = 30.0


def peer_wait(elastic_timeout: float) -> float:
    """How long an actor of a run with ``--elastic-timeout elastic_timeout`` waits on a peer."""
    return max(WAIT_FLOOR_S, elastic_timeout)


def pieces(width: int, itemsize: int) -> list[range]:
    """The column ranges of a push to a server of ``width`` entries, in the order they go."""
    return cuts.fixed(width, max(1, PIECE_BYTES // itemsize))


class PeerLost(ObjectLostError):
    """A server could not be reached: the step's inputs are lost, as when an object is."""

    def __init__(self, what: str):
        super().__init__("", None, "")
        self.what = what

    def __str__(self) -> str:
        return self.what

    def __reduce__(self):
        return PeerLost, (self.what,)


@dataclass(frozen=True)
class Handle:
    """Where a server's range of the weights is: a few dozen bytes."""

    address: tuple[str, int]  # where the server listens
    node: str = ""  # with shared memory: the server's Ray node
    block: shm.Region | None = None  # with shared memory: the range in the server's memory
    actor: object = None  # the server's actor: the object store's way to it (store.py)


# The requests a server answers (direct_server.Requests dispatches on their type), and its reply.

@dataclass(frozen=True)
class Reached:
    """Whether the server holds the weights after ``steps`` steps of ``window``, once it does (or
    no once the window ends without them); with ``pull`` the yes comes as the server starts
    that step's update, followed by their bytes, chunk by chunk as each is updated."""

    window: int
    steps: int
    pull: bool


@dataclass(frozen=True)
class Push:
    """``rows`` rows of the server's columns of a step's node values follow under ``key``, piece by
    piece from the last piece (``pieces``) to the first, then their meta (the micro-batches'
    errors, compute seconds)."""

    key: str
    step: int
    rows: int


@dataclass(frozen=True)
class Put:
    """A step's node values under ``key``, in ``block``: the memory of a worker of the server's node.
    From which column on they are done follows, as the worker's backward pass goes down (ints,
    the last 0), then their meta."""

    key: str
    step: int
    block: shm.Region


@dataclass(frozen=True)
class Reply:
    """The server's answer to ``Reached``, ``Push`` and ``Put``."""

    yes: bool


class Direct:
    """The vectors between the actors themselves: sockets between nodes, shared memory within one."""

    name = "direct"
    # Whether a worker and a server of one node share memory (where the system has memfds).  The
    # tests switch it off in the driver, before the transport is made, to send every vector over
    # a socket on one machine, as between nodes.
    within_node = True
    # Whether the servers listen for sockets.  The tests switch it off (with ``within_node``) to
    # make every pair find the server's socket out of reach: then it goes through the object store.
    sockets = True

    def __init__(self, size: int, dtype, servers: int, wait_s: float = WAIT_FLOOR_S,
                 edges: list[int] | None = None):
        """``wait_s``: how long an actor waits on a peer before it gives up (``peer_wait`` of the
        run's --elastic-timeout: Session); a server's wait then ends its window, as a call-off does.
        ``edges``: where each layer starts in the flat vector, then its end (``cuts.striped``)."""
        self.size, self.dtype, self.wait_s = size, np.dtype(dtype), wait_s
        self.parts = cuts.striped(size, servers, edges)
        self.key = channel.new_key()  # made for this run; reaches the actors in their Ray arguments
        self.share_node = self.within_node and shm.memfd_available()
        self.listen = self.sockets

    def worker_end(self):
        from .direct_worker import DirectWorker
        return DirectWorker(self)

    def server_end(self, s: int):
        from .direct_server import DirectServer
        return DirectServer(self, self.parts[s])

