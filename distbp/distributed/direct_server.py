"""The direct transport's server end (direct.py): a server's range of the weights, where the
workers reach it, and its answers to their requests.

``DirectServer`` is what the parameter-server actor holds: its range of the weights (in shared
memory, for workers of its node), the node values a step reads (``collect``), its inbox
(inbox.py) and its board (board.py).  ``Requests`` answers
each connection's requests on a thread of its own, one handler per request type, as ps-lite's
request handle does for its server.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import ray

from ..lecture import cuts
from . import channel, shm
from .board import Board
from .direct import Direct, Handle, PeerLost, Push, Put, Reached, Reply, pieces
from .inbox import Entry, Inbox, Late
from .store import StoreDoor, me

UNREACHABLE = ("127.0.0.1", 1)  # where a server that does not listen (Direct.sockets off) says it does


class DirectServer:
    """Server ``s``'s end of the direct transport: its ``part`` of the flat vector."""

    def __init__(self, transport: Direct, part: cuts.Part):
        self.part, self.dtype = part, transport.dtype
        self.width = len(part)
        self.weights: np.ndarray | None = None  # its range of the weights (``own``)
        # one lock for the inbox and the board: a window's end ends the waits of both
        changed = threading.Condition(threading.Lock())
        self.inbox = Inbox(self.width, self.dtype, changed, transport.wait_s)
        self.board = Board(changed, transport.wait_s)
        self.post = channel.Listener(ray.util.get_node_ip_address(), transport.key, Requests(self).serve) \
            if transport.listen else None
        self.address = self.post.address if self.post else UNREACHABLE
        self.door = StoreDoor(self)  # for workers that cannot reach the socket, and the driver's call-offs
        # with shared memory: the range in a memfd, for workers of this node; their rows mapped
        self.node = ray.get_runtime_context().get_node_id() if transport.share_node else None
        self.maps = shm.Maps()
        self.memory = shm.Memfds() if self.node else None
        self.block: shm.Region | None = None

    def own(self, weights: np.ndarray) -> np.ndarray:
        """This server's part of the starting ``weights`` (the whole vector), as an array it owns."""
        mine = self.part.take(weights)
        if self.memory is None:
            self.weights = np.array(mine)
        else:
            self.block = self.memory.new("weights-", (self.width,), self.dtype)
            self.weights = self.maps.view(self.block, writable=True)
            np.copyto(self.weights, mine)
        return self.weights

    def publish(self, weights: np.ndarray) -> Handle:
        """Where the workers pull the range from (or, on this node, map it)."""
        return Handle(self.address, self.node or "", self.block, me())

    def answer(self, request):
        """A peer's request through Ray (``ParameterServer.ask``): the driver's call-off, another
        server's sums, a worker's that cannot reach the socket (store.py)."""
        return self.door.answer(request)

    def applied(self, steps: int) -> None:
        """The server holds the weights after ``steps`` steps (``ServerState.on_applied``)."""
        self.board.applied(steps)

    def collect(self, keys: list[str], step: int, n: int, nodes: list[list]) -> tuple | Late | None:
        """A window's step: the values under ``keys`` (the tasks' tree ``nodes`` over ``n``
        micro-batches), once each has started to come in, and a function that gives their metas
        once they are all in; None if the window is called off (or nothing came for
        ``Direct.wait_s``) before, ``Late`` if a task is late by the crew's rule (inbox.py).  The
        third item is ``ready(lo, hi)`` for the server's sum (step/server.py): it waits until
        columns ``[lo, hi)`` of every pushed row are in, or says no when the window is called off;
        a push's meta comes with its last columns (those from 0)."""
        def over() -> bool:
            return self.board.over
        entries = self.inbox.shares(keys, n, nodes, over)
        if entries is None or isinstance(entries, Late):
            return entries
        return self._values(entries, step), lambda: [entry.meta for entry in entries], self.inbox.ready(entries, over)

    def _values(self, entries: list[Entry], step: int) -> list[np.ndarray]:
        """The entries' columns: pushed rows, or rows of a worker of this node read in place
        (PeerLost, the step's inputs lost, if that worker is gone and its memory with it)."""
        if self.node:  # unmap the rows of calls done with, keep the weights
            self.maps.retain([*(e.block for e in entries if e.block is not None), self.block])
        self.inbox.recycle(entries, step)
        try:
            return [e.rows if e.block is None else self._in_place(self.maps.view(e.block)) for e in entries]
        except OSError as exc:
            raise PeerLost(f"the node values of a worker on this node are gone ({exc})") from None

    def _in_place(self, rows: np.ndarray):
        """This server's columns of a worker's ``rows`` of this node, read where they are."""
        return self.part.take(rows) if len(self.part.runs) == 1 else InPlace(rows, self.part)


class InPlace:
    """A worker's rows of this node, read in place: the server's part's columns of each
    (``part.take`` of a row slice; a copy only where a slice spans two runs of the part)."""

    def __init__(self, rows: np.ndarray, part: cuts.Part):
        self.rows, self.part = rows, part
        self.nbytes = len(rows) * len(part) * rows.itemsize

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return (Row(row, self.part) for row in self.rows)


class Row:
    """One row of ``InPlace``: ``row[lo:hi]`` is columns ``[lo, hi)`` of the part."""

    def __init__(self, row: np.ndarray, part: cuts.Part):
        self.row, self.part = row, part

    def __getitem__(self, columns: slice) -> np.ndarray:
        runs = [self.row[r.start:r.stop] for _, r in self.part.segments(columns.start, columns.stop)]
        return runs[0] if len(runs) == 1 else np.concatenate(runs)


class Requests:
    """A server's answers to the requests of one worker's connection."""

    def __init__(self, server: DirectServer):
        self.server, self.inbox, self.board = server, server.inbox, server.board
        self.pieces = pieces(server.width, server.dtype.itemsize)
        self.handlers = {Reached: self.reached, Push: self.push, Put: self.put}

    def serve(self, sock: socket.socket) -> None:
        """One peer's requests, until it leaves (channel.Listener runs this on a thread of its own)."""
        while True:
            request = channel.recv(sock)
            handler = self.handlers.get(type(request))
            if handler is None:
                raise EOFError(f"unknown request {request!r}")
            handler(sock, request)

    def reached(self, sock: socket.socket, request: Reached) -> None:
        """Yes once the server holds the weights after ``request.steps`` steps (with ``pull``, as
        soon as it starts updating them, then the range in order, each chunk as soon as it holds
        its new weights: the update of the later chunks goes on meanwhile), or no once the window
        ends without them."""
        yes = self.board.reached(request.window, request.steps, request.pull)
        channel.send(sock, Reply(yes))
        if not (yes and request.pull):
            return
        at, width = 0, self.server.width
        while at < width:
            stop = self.board.next_chunk(at, request.steps, width)
            channel.send_array(sock, self.server.weights[at:stop])
            at = stop

    def push(self, sock: socket.socket, request: Push) -> None:
        """Filed at once, then read piece by piece from the top (the worker sends a layer's while
        it computes the layer below), then its meta: a window's step sums each piece as it is in.
        The entry is complete with its meta, which comes right after the last piece."""
        entry = Entry(request.step, self.inbox.buffer(request.rows), None, None, self.server.width, complete=False)
        self.inbox.file(request.key, entry)
        for piece in reversed(self.pieces):
            for row in entry.rows:
                channel.recv_array(sock, row[piece.start:piece.stop])
            self.inbox.arrived(entry, piece.start, channel.recv(sock) if piece.start == 0 else None)
        channel.send(sock, Reply(True))

    def put(self, sock: socket.socket, request: Put) -> None:
        """Filed at once; then from which column on the rows are done, as the worker says, down to
        0, then the meta: a window's step sums each chunk as it is done, as with a push."""
        entry = Entry(request.step, None, request.block, None, self.server.width, complete=False)
        self.inbox.file(request.key, entry)
        since = self.server.width
        while since:
            since = channel.recv(sock)
            self.inbox.arrived(entry, since, channel.recv(sock) if since == 0 else None)
        channel.send(sock, Reply(True))
