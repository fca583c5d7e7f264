"""The direct transport: the per-step vectors between the actors themselves, not through Ray.

Each worker-server pair takes one of two ways, decided when they first meet: between nodes an
authenticated TCP connection (channel.py), within a node shared memory (a memfd of the actor
that owns the array, mapped by the other: shm.Memfds, nothing to clean up when an actor dies).
Only handles (an address, a key, a memfd's path) go through Ray.  Each server listens on its
Ray node's address and holds:

- its range of the weights, which a worker *pulls* at the start of a call, straight into its
  own weight buffer (``("pull",)`` -> the range's bytes), or, on the server's node, copies
  from the server's memory (with one server: reads in place);
- an inbox of the node values the workers *push* at the end of a call (``("push", key, rows)``
  then ``rows`` rows of this server's columns, answered with ``True`` once all are in), from
  which its step takes the rows named by the handles Ray passed it.  A worker of the server's
  node computes into its own shared memory instead, and the server reads its columns in place.

So only the bytes between nodes cross a socket: with one server per node, what a
reduce-scatter plus an all-gather would send.

Why a read never overlaps a write that matters: a worker's call of step t + 1 runs only once
the servers' step t has returned (its arguments), and the driver sends the servers step t + 1
only once the calls it uses have returned, which is after their pushes were acknowledged.  A
late copy nobody waits for may pull weights while a server updates them, or push after the
step was taken: its result is dropped.

Windows of steps (windows.py) use the same connections: a worker asks each server for the
weights after a given step of a window (``("reached", window, version, pull)``, answered once
the server holds them, or no if the window ended before), and hands in its rows under a key
the driver chose (``push`` or, on the server's node, ``put`` of a memfd's handle) with its
micro-batch losses and compute time; the server's step waits for its keys (``collect``).  The
driver calls a window off (``call_off``: a connection of its own, with the run's key) when
something in it failed, and every server then ends its steps and says no to waiting workers.

Within a window's step the bytes between nodes flow as in BytePS: a push goes piece by piece
(``PIECE_BYTES`` of every row at a time) and the server sums each chunk of the gradient as soon
as its pieces are in (``collect``'s ``ready``), while the rest still arrives; and a pull of the
weights after a step is answered as soon as the server starts updating, chunk by chunk in the
order of the vector, each chunk the moment it holds its new weights (``updated``, ``_stream``).
A server sends nothing of a step it refuses: it checks the loss and the whole sum before it
updates any chunk.

Failures keep the crew's meaning: a server that cannot be reached (it died, its node is
gone) makes the worker's call fail with ``PeerLost``, an ``ObjectLostError`` ("the step's
inputs are lost"), so the driver recovers the servers as it does when an object is lost; a
worker that dies mid-push leaves only a partial entry, which no handle names and the next
step throws away; a worker of the server's node that dies after its call returned takes its
node values with it: the server's step then fails with the step's inputs lost, and the driver
redoes the step.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import ObjectLostError

from ..lecture import cuts
from . import channel, shm

WAIT_S = 600.0  # a window's wait for a step's values or weights gives up after this (windows.py)
PIECE_BYTES = 1 << 20  # a push goes this many bytes of every row at a time


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
    """Where a server listens and, for node values, which of its inbox entries: a few dozen bytes."""

    address: tuple[str, int]
    key: str = ""  # the inbox entry (empty for the weights, and for node values in ``block``)
    step: int = 0
    node: str = ""  # with share_node: the Ray node of the actor that made it
    block: shm.Block | None = None  # with share_node: the same array in that actor's shared memory


class Direct:
    """The vectors between the actors themselves: sockets between nodes, shared memory within one."""

    name = "direct"
    windows = True  # the actors talk directly: steps can go without Ray calls (windows.py)
    # Whether a worker and a server of one node share memory (where the system has memfds).  The
    # tests switch it off in the driver, before the transport is made, to send every vector over
    # a socket on one machine, as between nodes.
    within_node = True

    def __init__(self, size: int, dtype, servers: int):
        self.size, self.dtype = size, np.dtype(dtype)
        self.bounds = cuts.aligned(size, servers)
        self.key = channel.new_key()  # made for this run; reaches the actors in their Ray arguments
        self.share_node = self.within_node and shm.memfd_available()

    def worker_end(self) -> _SocketWorker:
        return _SocketWorker(self)

    def server_end(self, s: int) -> _SocketServer:
        return _SocketServer(self, self.bounds[s])


class _SocketWorker:
    def __init__(self, transport: Direct):
        self.bounds, self.dtype, self.key = transport.bounds, transport.dtype, transport.key
        self.flat = np.empty(transport.size, transport.dtype)
        self.out = np.empty((0, transport.size), dtype=transport.dtype)
        self.links: dict[tuple[str, int], socket.socket] = {}  # one connection per server, kept
        # servers whose answer to a window's hand-in is still to be read: before their next answer
        self.unacked: set[tuple[str, int]] = set()
        self.servers: tuple[Handle, ...] = ()
        self.me = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.calls = itertools.count()
        self.step = 0
        # share_node: the node values in shared memory, the servers' weights of this node mapped
        self.node = ray.get_runtime_context().get_node_id() if transport.share_node else None
        self.maps = shm.Maps()
        self.shared = shm.Rows(shm.Memfds(), self.maps, transport.size, transport.dtype) if self.node else None
        self.block: shm.Block | None = None  # the rows of the current call, in shared memory

    def _talk(self, address: tuple[str, int], talk):
        """``talk(sock)`` on the connection to ``address``; PeerLost if the server cannot be reached."""
        sock = self.links.get(address)
        try:
            if sock is None:
                sock = self.links[address] = channel.connect(address, self.key)
            return talk(sock)
        except (OSError, EOFError) as exc:
            self.links.pop(address, None)
            self.unacked.discard(address)
            if sock is not None:
                sock.close()
            raise PeerLost(f"the server at {address[0]}:{address[1]} cannot be reached ({exc})") from None

    def _here(self, handle: Handle) -> bool:
        """Whether ``handle``'s server shares this worker's node (and memory): share_node only."""
        return handle.block is not None and handle.node == self.node

    def _view(self, handle: Handle) -> np.ndarray:
        """A server's weight range of this node, mapped in place; PeerLost if it is gone."""
        try:
            return self.maps.view(handle.block)
        except OSError as exc:
            raise PeerLost(f"the server at {handle.address[0]}:{handle.address[1]} is gone ({exc})") from None

    def weights(self, parts: tuple[Handle, ...], ahead: tuple[int, int] | None = None) -> np.ndarray | None:
        """The whole weight vector, each server's range pulled into its place in one buffer (or,
        from a server of this node, copied from its memory; one such server: read in place).

        ``ahead = (window, version)``: a step of a window (windows.py), whose weights are those
        after step ``version``: each server answers once it holds them, or says the window
        ended before (then None)."""
        if self.node:  # unmap the weights of servers that were replaced
            mine = [self.shared.file] if self.shared.file else []
            self.maps.retain([h.block for h in parts if self._here(h)] + mine)
        self.servers = parts
        single = len(parts) == 1 and self._here(parts[0])  # read in place
        for handle, r in zip(parts, self.bounds):
            dst = self.flat[r.start:r.stop]
            address = handle.address
            if self._here(handle):
                def reached(sock, address=address) -> bool:
                    return self._reached(sock, address, ahead, False)
                if ahead is not None and not self._talk(address, reached):
                    return None
                if not single:
                    np.copyto(dst, self._view(handle))
                continue

            def pull(sock, dst=dst, address=address) -> bool:
                if ahead is None:
                    channel.send(sock, ("pull",))
                    self._acked(sock, address)
                elif not self._reached(sock, address, ahead, True):
                    return False
                channel.recv_array(sock, dst)
                return True
            if not self._talk(address, pull):
                return None
        return self._view(parts[0]) if single else self.flat

    def _reached(self, sock: socket.socket, address: tuple[str, int], ahead: tuple[int, int], pull: bool) -> bool:
        """Ask a server whether it holds the weights after step ``version`` of ``window``, waiting
        until it does; with ``pull`` a yes is followed by the range's bytes (``weights`` reads them)."""
        channel.send(sock, ("reached", *ahead, pull))
        self._acked(sock, address)
        return channel.recv(sock) == (True,)

    def _acked(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Read the server's answer to this worker's last hand-in, if it is still to be read: it
        comes before the answer to the request just sent (one connection, answered in order)."""
        if address in self.unacked:
            self.unacked.discard(address)
            _taken(sock)

    def settle(self) -> None:
        """Read every answer to a hand-in still to be read (the end of a window's call)."""
        for address in list(self.unacked):
            self._owed(address)

    def _owed(self, address: tuple[str, int]) -> None:
        """Read the answer to a hand-in that ``address`` still owes, on its own (no request with it)."""
        if address in self.unacked:
            self._talk(address, lambda sock: self._acked(sock, address))

    def rows(self, step: int, count: int) -> np.ndarray:
        """``count`` rows to compute node values into: a buffer of this worker's, reused (in shared
        memory with share_node: a server of this node reads them in place)."""
        self.step = step
        if self.shared is not None:
            self.block, values = self.shared.take(step, count)
            return values
        if len(self.out) < count:
            self.out = np.empty((count, self.out.shape[1]), dtype=self.dtype)
        return self.out[:count]

    def send(self, values: np.ndarray) -> list[Handle]:
        """Push each server its columns of ``values``; returns, for each server, the handle of them."""
        key = f"{self.me}-{next(self.calls)}"
        handles = []
        for handle, r in zip(self.servers, self.bounds):
            if self._here(handle):  # the server reads its columns in place
                handles.append(Handle(handle.address, "", self.step, self.node, self.block))
                continue
            self._talk(handle.address, lambda sock, lo=r.start, hi=r.stop: self._push(sock, key, values, lo, hi))
            handles.append(Handle(handle.address, key, self.step))
        return handles

    def hand_in(self, values: np.ndarray, key: str, meta: tuple) -> None:
        """A window's step (windows.py): each server gets its columns of ``values`` under ``key``, with
        ``meta`` (the micro-batches' errors and the compute seconds); a server of this node gets
        only where the rows are in this worker's memory.  The servers' answers are read with the
        next request to each (``_acked``), not waited for here: no round trip of its own."""
        for handle, r in zip(self.servers, self.bounds):
            self._owed(handle.address)  # the last hand-in's answer comes before this one's
            if self._here(handle):
                def put(sock):
                    channel.send(sock, ("put", key, self.step, self.block, meta))
                self._talk(handle.address, put)
            else:
                def push(sock, lo=r.start, hi=r.stop):
                    self._push(sock, key, values, lo, hi, meta, wait=False)
                self._talk(handle.address, push)
            self.unacked.add(handle.address)

    def _push(self, sock: socket.socket, key: str, values: np.ndarray, lo: int, hi: int, meta=None,
              wait: bool = True) -> None:
        """Columns ``[lo, hi)`` of every row, piece by piece (``pieces``): the server sums a piece
        while the next arrives.  ``wait``: read the server's answer now."""
        channel.send(sock, ("push", key, self.step, len(values), meta))
        for piece in pieces(hi - lo, values.itemsize):
            for row in values:
                channel.send_array(sock, row[lo + piece.start:lo + piece.stop])  # contiguous in a row
        if wait:
            _taken(sock)


def _taken(sock: socket.socket) -> None:
    """The server's answer to a push or a put: it has the rows (EOFError if it says otherwise)."""
    if channel.recv(sock) != (True,):
        raise EOFError("the server did not take the rows")


@dataclass
class _Entry:
    """Node values in a server's inbox: pushed ``rows``, or a ``block`` of a worker of its node."""

    step: int
    rows: np.ndarray | None
    block: shm.Block | None = None
    meta: tuple | None = None  # a window's step: (the micro-batches' errors, compute seconds)
    upto: int = 0  # pushed rows: the columns in so far, of every row
    complete: bool = True  # pushed rows: all in (until then a thread still writes ``rows``)


class _SocketServer:
    def __init__(self, transport: Direct, bounds: range):
        self.bounds, self.dtype = bounds, transport.dtype
        self.width = bounds.stop - bounds.start
        self.held: np.ndarray | None = None
        self.inbox: dict[str, _Entry] = {}  # pushes as soon as they start, and puts
        self.pieces = pieces(self.width, self.dtype.itemsize)
        self.spare: list[np.ndarray] = []  # buffers of taken steps, reused for new pushes
        self.taken: list[_Entry] = []  # the pushed entries the last step read
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # the inbox, the steps held, the window
        # Windows (windows.py): the steps this server holds, the window it runs or ran last,
        # whether that one is over, and the highest window the driver called off.
        self.version, self.window, self.over, self.called_off = 0, 0, True, 0
        # The chunks updated since the last step held: start -> (stop, step) (``updated``)
        self.fresh: dict[int, tuple[int, int]] = {}
        self.post = channel.Post(ray.util.get_node_ip_address(), transport.key, self._serve)
        # share_node: the range in shared memory, for workers of this node; their rows mapped
        self.node = ray.get_runtime_context().get_node_id() if transport.share_node else None
        self.maps = shm.Maps()
        self.memory = shm.Memfds() if self.node else None
        self.block: shm.Block | None = None

    def _buffer(self, rows: int) -> np.ndarray:
        with self.lock:
            for i, buf in enumerate(self.spare):
                if len(buf) >= rows:
                    return self.spare.pop(i)[:rows]
        return np.empty((max(rows, 2), self.width), dtype=self.dtype)[:rows]

    def _serve(self, sock: socket.socket) -> None:
        """One peer's requests (a worker's, or the driver's call-off), until it leaves."""
        while True:
            request = channel.recv(sock)
            if request[0] == "pull":
                channel.send_array(sock, self.held)
            elif request[0] == "reached":
                _, window, version, pull = request
                ok = self._reached(window, version, pull)
                channel.send(sock, (ok,))
                if ok and pull:
                    self._stream(sock, version)
            elif request[0] == "push":
                _, key, step, rows, meta = request
                entry = _Entry(step, self._buffer(rows), None, meta, complete=False)
                self._file(key, entry)  # at once: a window's step sums each piece as it is in
                for piece in self.pieces:
                    for row in entry.rows:
                        channel.recv_array(sock, row[piece.start:piece.stop])
                    with self.changed:
                        entry.upto = piece.stop
                        self.changed.notify_all()
                with self.changed:
                    entry.complete = True
                channel.send(sock, (True,))
            elif request[0] == "put":
                _, key, step, block, meta = request
                self._file(key, _Entry(step, None, block, meta))
                channel.send(sock, (True,))
            elif request[0] == "call off":
                with self.changed:
                    self.called_off = max(self.called_off, request[1])
                    self.over = self.over or self.window <= self.called_off
                    self.changed.notify_all()
                channel.send(sock, (True,))
            else:
                raise EOFError(f"unknown request {request[0]!r}")

    def _file(self, key: str, entry: _Entry) -> None:
        with self.changed:
            self.inbox[key] = entry
            self.changed.notify_all()

    def _reached(self, window: int, version: int, pull: bool) -> bool:
        """Whether this server comes to hold ``version`` steps in ``window``: waits until it does
        (True), or until that window is over, called off or past without it (False).  With
        ``pull``, until it starts updating step ``version``: ``_stream`` sends the chunks as
        they are done."""
        def there() -> bool:
            return self.version >= version or (pull and any(step >= version for _, step in self.fresh.values()))

        def known() -> bool:
            return there() or self.window > window or self.called_off >= window or \
                (self.window == window and self.over)
        with self.changed:
            self.changed.wait_for(known, timeout=WAIT_S)
            return there()

    def _stream(self, sock: socket.socket, version: int) -> None:
        """The range after step ``version``, in order, each chunk as soon as it holds its new
        weights (a pull in a window: the update of the later chunks goes on meanwhile)."""
        at = 0
        while at < self.width:
            with self.changed:
                if not self.changed.wait_for(lambda at=at: self.version >= version or
                                             self.fresh.get(at, (0, -1))[1] >= version, timeout=WAIT_S):
                    raise EOFError(f"the weights after step {version} did not come")  # the worker's PeerLost
                stop = self.width if self.version >= version else self.fresh[at][0]
            channel.send_array(sock, self.held[at:stop])
            at = stop

    def updated(self, step: int, chunk: tuple[int, int]) -> None:
        """Entries ``chunk`` of the range hold the weights after ``step`` (while the rest is updated)."""
        with self.changed:
            self.fresh[chunk[0]] = (chunk[1], step)
            self.changed.notify_all()

    def hold(self, weights: np.ndarray) -> np.ndarray:
        """This server's range of the starting ``weights`` (the whole vector), as an array it owns."""
        mine = weights[self.bounds.start:self.bounds.stop]
        if self.memory is None:
            self.held = np.array(mine)
        else:
            self.block = self.memory.new("weights-", (self.width,), self.dtype)
            self.held = self.maps.view(self.block, writable=True)
            np.copyto(self.held, mine)
        return self.held

    def publish(self, held: np.ndarray) -> Handle:
        """Where the workers pull the range from (or, on this node, map it)."""
        return Handle(self.post.address, node=self.node or "", block=self.block)

    def holds(self, steps: int) -> None:
        """The server holds the weights after ``steps`` steps (a step applied, or a checkpoint loaded)."""
        with self.changed:
            self.version = steps
            self.fresh.clear()
            self.changed.notify_all()

    def receive(self, parts: tuple[Handle, ...]) -> list[np.ndarray]:
        """Each task's rows of this server's columns, from the inbox (or read in place from a
        worker of this node).  The rows of the step before go back to the spare buffers, and
        entries of earlier steps (late copies nobody used) are dropped."""
        step = max((part.step for part in parts), default=0)
        with self.lock:
            missing = [part.key for part in parts
                       if part.block is None and (part.key not in self.inbox or not self.inbox[part.key].complete)]
            if missing:
                raise RuntimeError(f"node values {missing} never reached this server")
            entries = [_Entry(part.step, None, part.block) if part.block is not None else self.inbox.pop(part.key)
                       for part in parts]
        return self._values(entries, step)

    def begin(self, window: int) -> None:
        """Window ``window`` starts (windows.py): unless the driver has called it off already."""
        with self.changed:
            self.window, self.over = window, window <= self.called_off
            self.changed.notify_all()

    def end(self) -> None:
        """The window is over: a worker still waiting for a step it will not have is told so."""
        with self.changed:
            self.over = True
            self.changed.notify_all()

    def collect(self, keys: list[str], step: int) -> tuple[list[np.ndarray], list[tuple], Callable] | None:
        """A window's step: the values and metas under ``keys``, once each has started to come in;
        None if the window is called off (or nothing came for ``WAIT_S``) before.  The third
        item is ``ready(lo, hi)`` for the server's sum (step/server.py): it waits until columns
        ``[lo, hi)`` of every pushed row are in, or says no when the window is called off."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.over or all(key in self.inbox for key in keys), timeout=WAIT_S) \
                    or self.over:
                return None
            entries = [self.inbox.pop(key) for key in keys]
        pushed = [entry for entry in entries if entry.block is None]

        def ready(lo: int, hi: int) -> bool:
            with self.changed:
                return self.changed.wait_for(lambda: self.over or all(e.upto >= hi for e in pushed),
                                             timeout=WAIT_S) and not self.over
        return self._values(entries, step), [entry.meta for entry in entries], ready

    def _values(self, entries: list[_Entry], step: int) -> list[np.ndarray]:
        """The entries' columns: pushed rows, or rows of a worker of this node read in place.  The
        rows the step before read go back to the spare buffers; entries of earlier steps (late
        copies nobody used) are dropped."""
        if self.node:  # unmap the rows of calls done with, keep the weights
            self.maps.retain([*(e.block for e in entries if e.block is not None), self.block])
        with self.lock:  # a buffer goes back only once no thread writes it (its push is complete)
            self.spare += [_whole(e.rows) for e in self.taken if e.complete]
            self.taken = [e for e in entries if e.block is None]
            for key in [k for k, e in self.inbox.items() if e.step < step]:
                old = self.inbox.pop(key)
                if old.rows is not None and old.complete:
                    self.spare.append(_whole(old.rows))
        return [e.rows if e.block is None else self._columns(e.block) for e in entries]

    def _columns(self, block: shm.Block) -> np.ndarray:
        """This server's columns of a worker's rows on this node, read in place; PeerLost (the
        step's inputs are lost) if the worker is gone and its memory with it."""
        try:
            return self.maps.view(block)[:, self.bounds.start:self.bounds.stop]
        except OSError as exc:
            raise PeerLost(f"the node values of a worker on this node are gone ({exc})") from None


def _whole(rows: np.ndarray) -> np.ndarray:
    """The buffer ``rows`` was cut from (``_buffer``)."""
    return rows.base if rows.base is not None else rows


def call_off(transport: Direct, servers: list[Handle], window: int) -> None:
    """The driver calls window ``window`` off (a worker of it failed): each server that can be
    reached ends its steps there and tells its waiting workers so."""
    for handle in servers:
        try:
            with channel.connect(handle.address, transport.key) as sock:
                channel.send(sock, ("call off", window))
                channel.recv(sock)
        except (OSError, EOFError):
            pass  # a server that is gone runs no window
