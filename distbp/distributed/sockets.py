"""The socket transport: the per-step vectors over authenticated TCP between the actors.

Made for runs across nodes (transport.py says when it is chosen; channel.py has the wire).
Each server listens on its Ray node's address and holds:

- its range of the weights, which a worker *pulls* at the start of a call, straight into its
  own weight buffer (``("pull",)`` -> the range's bytes);
- an inbox of the node values the workers *push* at the end of a call (``("push", key, rows)``
  then ``rows`` rows of this server's columns, answered with ``True`` once all are in), from
  which its step takes the rows named by the handles Ray passed it.

Why a read never overlaps a write that matters: the same as for shared memory (shm.py).  A
worker's call of step t + 1 runs only once the servers' step t has returned (its arguments),
and the driver sends the servers step t + 1 only once the calls it uses have returned, which
is after their pushes were acknowledged.  A late copy nobody waits for may pull weights while
a server updates them, or push after the step was taken: its result is dropped.

Failures keep the crew's meaning: a server that cannot be reached (it died, its node is
gone) makes the worker's call fail with ``PeerLost``, an ``ObjectLostError`` ("the step's
inputs are lost"), so the driver recovers the servers as it does when an object is lost; a
worker that dies mid-push leaves only a partial entry, which no handle names and the next
step throws away.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import ObjectLostError

from ..lecture import cuts
from . import channel


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
    key: str = ""  # the inbox entry (empty for the weights)
    step: int = 0


class Sockets:
    """The vectors over authenticated TCP between the actors: works across nodes."""

    name = "socket"

    def __init__(self, size: int, dtype, servers: int):
        self.size, self.dtype = size, np.dtype(dtype)
        self.bounds = cuts.aligned(size, servers)
        self.key = channel.new_key()  # made for this run; reaches the actors in their Ray arguments

    def worker_end(self) -> _SocketWorker:
        return _SocketWorker(self)

    def server_end(self, s: int) -> _SocketServer:
        return _SocketServer(self, self.bounds[s])

    def close(self) -> None:
        pass


class _SocketWorker:
    def __init__(self, transport: Sockets):
        self.bounds, self.dtype, self.key = transport.bounds, transport.dtype, transport.key
        self.flat = np.empty(transport.size, transport.dtype)
        self.out = np.empty((0, transport.size), dtype=transport.dtype)
        self.links: dict[tuple[str, int], socket.socket] = {}  # one connection per server, kept
        self.servers: tuple[Handle, ...] = ()
        self.me = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.calls = itertools.count()
        self.step = 0

    def _talk(self, address: tuple[str, int], talk):
        """``talk(sock)`` on the connection to ``address``; PeerLost if the server cannot be reached."""
        sock = self.links.get(address)
        try:
            if sock is None:
                sock = self.links[address] = channel.connect(address, self.key)
            return talk(sock)
        except (OSError, EOFError) as exc:
            self.links.pop(address, None)
            if sock is not None:
                sock.close()
            raise PeerLost(f"the server at {address[0]}:{address[1]} cannot be reached ({exc})") from None

    def weights(self, parts: tuple[Handle, ...]) -> np.ndarray:
        """The whole weight vector, each server's range pulled into its place in one buffer."""
        self.servers = parts
        for handle, r in zip(parts, self.bounds):
            def pull(sock, dst=self.flat[r.start:r.stop]):
                channel.send(sock, ("pull",))
                channel.recv_array(sock, dst)
            self._talk(handle.address, pull)
        return self.flat

    def rows(self, step: int, count: int) -> np.ndarray:
        """``count`` rows to compute node values into: a buffer of this worker's, reused."""
        if len(self.out) < count:
            self.out = np.empty((count, self.out.shape[1]), dtype=self.dtype)
        self.step = step
        return self.out[:count]

    def send(self, values: np.ndarray) -> list[Handle]:
        """Push each server its columns of ``values``; returns, for each server, the handle of them."""
        key = f"{self.me}-{next(self.calls)}"
        handles = []
        for handle, r in zip(self.servers, self.bounds):
            def push(sock, lo=r.start, hi=r.stop):
                channel.send(sock, ("push", key, self.step, len(values)))
                for row in values:
                    channel.send_array(sock, row[lo:hi])  # each row's columns are contiguous
                if channel.recv(sock) != (True,):
                    raise EOFError("the server did not take the rows")
            self._talk(handle.address, push)
            handles.append(Handle(handle.address, key, self.step))
        return handles


class _SocketServer:
    def __init__(self, transport: Sockets, bounds: range):
        self.bounds, self.dtype = bounds, transport.dtype
        self.width = bounds.stop - bounds.start
        self.held: np.ndarray | None = None
        self.inbox: dict[str, tuple[int, np.ndarray]] = {}  # key -> (step, rows), complete pushes only
        self.spare: list[np.ndarray] = []  # buffers of taken steps, reused for new pushes
        self.taken: list[np.ndarray] = []  # the buffers the last step read
        self.lock = threading.Lock()
        self.post = channel.Post(ray.util.get_node_ip_address(), transport.key, self._serve)

    def _buffer(self, rows: int) -> np.ndarray:
        with self.lock:
            for i, buf in enumerate(self.spare):
                if len(buf) >= rows:
                    return self.spare.pop(i)[:rows]
        return np.empty((max(rows, 2), self.width), dtype=self.dtype)[:rows]

    def _serve(self, sock: socket.socket) -> None:
        """One worker's requests, until it leaves."""
        while True:
            request = channel.recv(sock)
            if request[0] == "pull":
                channel.send_array(sock, self.held)
            elif request[0] == "push":
                _, key, step, rows = request
                buf = self._buffer(rows)
                for row in buf:
                    channel.recv_array(sock, row)
                with self.lock:
                    self.inbox[key] = (step, buf)
                channel.send(sock, (True,))
            else:
                raise EOFError(f"unknown request {request[0]!r}")

    def hold(self, weights: np.ndarray) -> np.ndarray:
        """This server's range of the starting ``weights`` (the whole vector), as an array it owns."""
        self.held = np.array(weights[self.bounds.start:self.bounds.stop])
        return self.held

    def publish(self, held: np.ndarray) -> Handle:
        """Where the workers pull the range from."""
        return Handle(self.post.address)

    def receive(self, parts: tuple[Handle, ...]) -> list[np.ndarray]:
        """Each task's rows of this server's columns, from the inbox.  The rows of the step
        before go back to the spare buffers, and entries of earlier steps (late copies nobody
        used) are dropped."""
        step = max((part.step for part in parts), default=0)
        with self.lock:
            self.spare += [buf.base if buf.base is not None else buf for buf in self.taken]
            missing = [part.key for part in parts if part.key not in self.inbox]
            if missing:
                raise RuntimeError(f"node values {missing} never reached this server")
            self.taken = [self.inbox.pop(part.key)[1] for part in parts]
            for key in [k for k, (s, _) in self.inbox.items() if s < step]:
                self.spare.append(self.inbox.pop(key)[1].base)
        return list(self.taken)
