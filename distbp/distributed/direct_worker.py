"""The direct transport's worker end (direct.py): the weights in, a share's node values out.

``DirectWorker`` is what a worker actor holds: one buffer for the whole weight vector, filled
from each server (pulled over its socket, or copied from the memory of a server of its node),
and the rows it computes node values into (its own shared memory where a server of its node
reads them in place).  ``Links`` are its connections, one per server, kept from call to call,
with the answers each server still owes it.  A server whose socket the worker cannot reach at
their first contact is reached through the object store from then on (store.py).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np
import ray

from . import channel, shm
from .direct import Direct, Handle, PeerLost, Push, Put, Reached, Reply, pieces
from .store import Hand, ask_weights, got

Address = tuple[str, int]
SOCKET, STORE = "socket", "object store"  # a worker's ways to a server
REACH_S = 5.0  # a server's socket not reached within this at the first contact: the object store


class Links:
    """A worker's connections to the servers, and the answers to hand-ins each still owes.

    A window's hand-in is not waited for: its answer is read with the server's next answer on
    the same connection (answered in order), after the next request has gone out, so that a
    step costs no round trip of its own."""

    def __init__(self, key: bytes, wait_s: float):
        """``wait_s``: the servers' own deadline (``Direct.wait_s``); a full listener is tried again
        for that long, and a server that says nothing for twice that long is taken for lost."""
        self.key, self.wait_s = key, wait_s
        self.socks: dict[Address, socket.socket] = {}
        self.unread: set[Address] = set()

    def talk(self, address: Address, talk: Callable[[socket.socket], object]):
        """``talk(sock)`` on the connection to ``address``; PeerLost if the server cannot be reached."""
        sock = self.socks.get(address)
        try:
            if sock is None:
                sock = self.socks[address] = channel.connect(address, self.key, within=self.wait_s,
                                                             timeout=2 * self.wait_s)
            return talk(sock)
        except (OSError, EOFError) as exc:
            self.socks.pop(address, None)
            self.unread.discard(address)
            if sock is not None:
                sock.close()
            raise PeerLost(f"the server at {address[0]}:{address[1]} cannot be reached ({exc})") from None

    def catch_up(self, sock: socket.socket, address: Address) -> None:
        """Read the answer ``address`` still owes, if it does (EOFError if it did not take the rows)."""
        if address in self.unread:
            self.unread.discard(address)
            if channel.recv(sock) != Reply(True):
                raise EOFError("the server did not take the rows")

    def reply(self, sock: socket.socket, address: Address) -> Reply:
        """The server's answer to the request just sent, after the one it still owes."""
        self.catch_up(sock, address)
        return channel.recv(sock)

    def reach(self, address: Address) -> bool:
        """Whether the server at ``address`` answers on its socket (a connection is kept), within
        ``REACH_S``: a refused or silent one is not reached."""
        if address in self.socks:
            return True
        try:
            self.socks[address] = channel.connect(address, self.key, within=REACH_S, timeout=2 * self.wait_s)
        except (OSError, EOFError):
            return False
        return True

    def read_answers(self) -> None:
        """Read every answer not read yet (the end of a window's call: what it returns was taken)."""
        for address in list(self.unread):
            self.talk(address, lambda sock, address=address: self.catch_up(sock, address))


class DirectWorker:
    """A worker's end of the direct transport."""

    def __init__(self, transport: Direct):
        self.bounds, self.dtype = transport.bounds, transport.dtype
        self.links = Links(transport.key, transport.wait_s)
        self.flat = np.empty(transport.size, transport.dtype)
        self.out = np.empty((0, transport.size), dtype=transport.dtype)
        self.servers: tuple[Handle, ...] = ()
        self.ways: dict[Address, str] = {}  # each server's way, decided at the first contact (``_way``)
        self.handed: list = []  # refs of this call's hand-ins through the object store
        self.step = 0
        # with shared memory: the node values in it, the servers' weights of this node mapped
        self.node = ray.get_runtime_context().get_node_id() if transport.share_node else None
        self.maps = shm.Maps()
        self.shared = shm.Rows(shm.Memfds(), self.maps, transport.size, transport.dtype) if self.node else None
        self.block: shm.Region | None = None  # the rows of the current call, in shared memory

    def _here(self, handle: Handle) -> bool:
        """Whether ``handle``'s server shares this worker's node (and memory)."""
        return handle.block is not None and handle.node == self.node

    def _view(self, handle: Handle) -> np.ndarray:
        """A server's weight range of this node, mapped in place; PeerLost if it is gone."""
        try:
            return self.maps.view(handle.block)
        except OSError as exc:
            raise PeerLost(f"the server at {handle.address[0]}:{handle.address[1]} is gone ({exc})") from None

    def weights(self, parts: tuple[Handle, ...], ahead: tuple[int, int]) -> np.ndarray | None:
        """The whole weight vector after ``steps`` steps of window ``window`` (``ahead``), each
        server's range pulled into its place in one buffer (or, from a server of this node, copied
        from its memory; one such server: read in place).  Each server answers once it holds
        them, or says the window ended before (then None)."""
        if self.node:  # unmap the weights of servers that were replaced
            mine = [self.shared.file] if self.shared.file else []
            self.maps.retain([h.block for h in parts if self._here(h)] + mine)
        self.servers = parts
        single = len(parts) == 1 and self._here(parts[0]) and self._way(parts[0]) == SOCKET  # read in place
        stored = [(handle, r) for handle, r in zip(parts, self.bounds) if self._way(handle) == STORE]
        if stored:  # servers whose sockets this worker cannot reach: through the object store
            ranges = ask_weights([handle.actor for handle, _ in stored], ahead, self.links.wait_s)
            if ranges is None:
                return None
            for (_, r), got in zip(stored, ranges):
                self.flat[r.start:r.stop] = got
        for handle, r in zip(parts, self.bounds):
            if self._way(handle) == STORE:
                continue
            here, dst = self._here(handle), self.flat[r.start:r.stop]

            def get(sock, here=here, dst=dst, address=handle.address) -> bool:
                channel.send(sock, Reached(*ahead, pull=not here))
                if self.links.reply(sock, address) != Reply(True):
                    return False
                if not here:
                    channel.recv_array(sock, dst)
                return True
            if not self.links.talk(handle.address, get):
                return None
            if here and not single:
                np.copyto(dst, self._view(handle))
        return self._view(parts[0]) if single else self.flat

    def _way(self, handle: Handle) -> str:
        """How this worker reaches ``handle``'s server, decided at their first contact: its socket
        (with its memory, on this node), or the object store where the socket cannot be reached."""
        way = self.ways.get(handle.address)
        if way is None:
            way = self.ways[handle.address] = SOCKET if self.links.reach(handle.address) else STORE
        return way

    def read_answers(self) -> None:
        """Read every answer to a hand-in not read yet (the end of a window's call)."""
        handed, self.handed = self.handed, []
        got(handed, self.links.wait_s)
        self.links.read_answers()

    def rows(self, step: int, count: int) -> np.ndarray:
        """``count`` rows to compute node values into: a buffer of this worker's, reused (in shared
        memory where it has some: a server of this node reads them in place)."""
        self.step = step
        if self.shared is not None:
            self.block, values = self.shared.take(step, count)
            return values
        if len(self.out) < count:
            self.out = np.empty((count, self.out.shape[1]), dtype=self.dtype)
        return self.out[:count]

    def hand_in(self, values: np.ndarray, key: str, meta: tuple) -> None:
        """A window's step (windows.py): each server gets its columns of ``values`` under ``key``, with
        ``meta`` (the micro-batches' errors and the compute seconds); a server of this node gets
        only where the rows are in this worker's memory.  The servers' answers are read with the
        next request to each (``Links.catch_up``), not waited for here: no round trip of its own."""
        for handle, r in zip(self.servers, self.bounds):
            if self._way(handle) == STORE:
                self.handed.append(handle.actor.ask.remote(Hand(key, self.step, values[:, r.start:r.stop], meta)))
                continue
            here = self._here(handle)

            def give(sock, here=here, lo=r.start, hi=r.stop, address=handle.address):
                self.links.catch_up(sock, address)  # the last hand-in's answer comes before this one's
                if here:
                    channel.send(sock, Put(key, self.step, self.block, meta))
                else:
                    self._push(sock, key, values, lo, hi, meta)
            self.links.talk(handle.address, give)
            self.links.unread.add(handle.address)

    def _push(self, sock: socket.socket, key: str, values: np.ndarray, lo: int, hi: int, meta=None) -> None:
        """Columns ``[lo, hi)`` of every row, piece by piece (``pieces``): the server sums a piece
        while the next arrives."""
        channel.send(sock, Push(key, self.step, len(values), meta))
        for piece in pieces(hi - lo, values.itemsize):
            for row in values:
                channel.send_array(sock, row[lo + piece.start:lo + piece.stop])  # contiguous in a row
