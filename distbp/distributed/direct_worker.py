"""The direct transport's worker end (direct.py): the weights in, a share's node values out.

``DirectWorker`` is what a worker actor holds: one buffer for the whole weight vector, filled
from each server (pulled over its socket, or copied from the memory of a server of its node),
and the rows it computes node values into (its own shared memory where a server of its node
reads them in place).  ``Links`` are its connections, one per server, kept from call to call,
with the answers each server still owes it.  A server whose socket the worker cannot reach at
their first contact is reached through the object store from then on (store.py).
"""

from __future__ import annotations

import queue
import socket
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray

from ..lecture import cuts
from . import channel, shm
from .arrival import Arrival
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
            self.drop(address)
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

    def drop(self, address: Address) -> None:
        """Close the connection to ``address`` (it failed, or a hand-in under way will not finish:
        the server throws its partial entry away); the next request connects again."""
        sock = self.socks.pop(address, None)
        self.unread.discard(address)
        if sock is not None:
            sock.close()

    def read_answers(self) -> None:
        """Read every answer not read yet (the end of a window's call: what it returns was taken)."""
        for address in list(self.unread):
            self.talk(address, lambda sock, address=address: self.catch_up(sock, address))


class DirectWorker:
    """A worker's end of the direct transport."""

    def __init__(self, transport: Direct):
        self.parts, self.dtype = transport.parts, transport.dtype
        self.links = Links(transport.key, transport.wait_s)
        self.flat = np.empty(transport.size, transport.dtype)
        self.out = np.empty((0, transport.size), dtype=transport.dtype)
        self.servers: tuple[Handle, ...] = ()
        self.ways: dict[Address, str] = {}  # each server's way, decided at the first contact (``_way``)
        self.handed: list = []  # refs of this call's hand-ins through the object store
        # a thread per server's link for the pulls, and one for the pushes: a pull still coming in
        # as a step's compute starts, and its pushes
        self.threads = ThreadPoolExecutor(2 * len(self.parts), "distbp-link")
        self.arrival = Arrival(transport.wait_s)  # how far the weights of the step are in
        self.pulling: list[futures.Future] = []  # the pulls of the step, on link threads
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

    def weights(self, handles: tuple[Handle, ...], ahead: tuple[int, int]) -> np.ndarray | None:
        """The whole weight vector after ``steps`` steps of window ``window`` (``ahead``), each
        server's part coming into its places in one buffer on a thread per link (``_pull``): from
        a server of another node chunk by chunk as it updates them, from one of this node copied
        from its memory (one such server: read in place).  Returns once every server has said yes
        (None if one says the window ended before); ``arrival`` tells how far the weights are in,
        and the step's compute reads each layer once it is (``hand_in``): the next forward pass
        starts on layer 1 while the layers above come over the wire."""
        self._joined()  # the pulls of a step without a hand-in (none reads a mapping unmapped here)
        if self.node:  # unmap the weights of servers that were replaced
            mine = [self.shared.file] if self.shared.file else []
            self.maps.retain([h.block for h in handles if self._here(h)] + mine)
        self.servers = handles
        single = len(handles) == 1 and self._here(handles[0]) and self._way(handles[0]) == SOCKET  # read in place
        socketed = [(handle, part) for handle, part in zip(handles, self.parts) if self._way(handle) == SOCKET]
        self.arrival.expect([part for _, part in socketed])
        self.pulling = [self.threads.submit(self._pull, handle, part, ahead, single) for handle, part in socketed]
        try:
            stored = [(handle, part) for handle, part in zip(handles, self.parts) if self._way(handle) == STORE]
            ranges = ask_weights([handle.actor for handle, _ in stored], ahead, self.links.wait_s) if stored else []
            for (_, part), got in zip(stored, ranges or ()):  # servers this worker cannot reach by socket
                part.put(self.flat, got)
            if self.arrival.answered() and ranges is not None:
                return self._view(handles[0]) if single else self.flat
        except BaseException:
            self._joined()
            raise
        self._joined()  # what the servers that said yes send is read: each connection stays in step
        return None

    def _pull(self, handle: Handle, part: cuts.Part, ahead: tuple[int, int], single: bool) -> None:
        """Server ``handle``'s part of the weights after ``ahead`` into its places, run by run, each
        told to ``arrival`` as it lands; from a server of this node, once it has updated them all, copied
        from its memory (or read there in place if ``single``): within a node there is no wire to
        hide, and its update would take the cores the compute needs.  Its errors too."""
        here, address = self._here(handle), handle.address

        def get(sock: socket.socket) -> None:
            channel.send(sock, Reached(*ahead, pull=not here))
            yes = self.links.reply(sock, address) == Reply(True)
            self.arrival.answer(yes)
            if yes and not here:
                for r in part.runs:
                    channel.recv_array(sock, self.flat[r.start:r.stop], self.arrival.into(r))
            elif yes:
                if not single:
                    part.put(self.flat, self._view(handle))
                for r in part.runs:
                    self.arrival.came(r, r.stop)
        try:
            self.links.talk(address, get)
        except BaseException as exc:
            self.arrival.fail(exc)
            raise

    def _joined(self) -> None:
        """Every pull of the step ended (``_pull``: each has its deadline); PeerLost if one failed."""
        pulling, self.pulling = self.pulling, []
        futures.wait(pulling)
        for pulled in pulling:
            pulled.result()

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

    def hand_in(self, values: np.ndarray, key: str, compute: Callable[[Callable | None, Arrival], tuple]) -> tuple:
        """A window's step (windows.py): ``compute(done, arrival)`` fills ``values`` layer by layer,
        reading each layer's weights once ``arrival`` says they are in, saying ``done(lo, hi)`` as
        columns ``[lo, hi)`` of every row are final (step/worker.py), and returns the step's
        ``meta`` (the micro-batches' errors and the compute seconds), which this returns.
        Each server gets its columns of ``values`` under ``key``, with ``meta``: those it reaches
        by socket as they are done, top layer first, each on a thread of this end's (``Stream``)
        while the layers below are computed; one through the object store, all at once at the
        end.  The servers' answers are read with the next request to each (``Links.catch_up``):
        no round trip of its own."""
        streams = [Stream(self.links, values, h, part, Put(key, self.step, self.block) if self._here(h)
                          else Push(key, self.step, len(values)))
                   for h, part in zip(self.servers, self.parts) if self._way(h) == SOCKET]
        sending = [self.threads.submit(stream.run) for stream in streams]
        meta = None
        try:
            meta = compute(self._marker(streams) if streams else None, self.arrival)
        finally:
            for stream in streams:  # the end; without meta, of a hand-in that will not finish
                stream.marks.put((0, True, meta))
            futures.wait(sending)  # no link's thread outlives the call: each send has its deadline
            self._joined()
        for sent in sending:
            sent.result()  # PeerLost if a server could not be reached
        for handle, part in zip(self.servers, self.parts):
            if self._way(handle) == STORE:
                self.handed.append(handle.actor.ask.remote(Hand(key, self.step, part.take(values), meta)))
        return meta

    @staticmethod
    def _marker(streams: list[Stream]) -> Callable[[int, int], None]:
        """``done(lo, hi)`` for the compute: every stream hears that columns ``lo`` and up are done."""
        def done(lo: int, hi: int) -> None:
            for stream in streams:
                stream.marks.put((lo, False, None))
        return done


class Stream:
    """A hand-in to one server the worker reaches by socket, from the top column down as its
    backward pass finishes each layer (``DirectWorker.hand_in`` runs ``run`` on a thread of its
    own, one per server): to a server of another node the columns themselves (a ``Push``), piece
    by piece (``pieces``), each piece once every row has it; to a server of this node, which reads
    the rows in place in the worker's memory (a ``Put``), from which column on they are done.
    After the last columns, the meta.  The server sums what is in while the rest comes."""

    def __init__(self, links: Links, values: np.ndarray, handle: Handle, part: cuts.Part, request: Push | Put):
        """``part``: the server's; ``request``: what opens the hand-in, with its first columns."""
        self.links, self.values, self.address, self.part, self.request = links, values, handle.address, part, request
        self.here = isinstance(request, Put)
        self.left = pieces(len(part), values.itemsize)  # pieces not sent yet (a push's), of the part's columns
        self.told = len(part)  # "done from" said so far (a put's)
        self.marks: queue.SimpleQueue = queue.SimpleQueue()  # (columns from here up are done, the end?, meta)
        self.opened = False

    def run(self) -> None:
        """Send what ``marks`` say is done, until the last.  A last mark without meta (the compute
        failed) drops the connection if the hand-in was opened: the server throws the partial
        entry away, and no step takes it."""
        while True:
            since, last, meta = self.marks.get()
            if last and meta is None:
                if self.opened:
                    self.links.drop(self.address)
                return
            self.links.talk(self.address, lambda sock, since=since: self._send(sock, since))
            if last:
                self.links.talk(self.address, lambda sock, meta=meta: channel.send(sock, meta))
                self.links.unread.add(self.address)
                return

    def _send(self, sock: socket.socket, since: int) -> None:
        """What the server has not had of columns ``[since, ...)`` of the vector."""
        lo = self.part.local(since)  # the part's columns from here on are done
        if self.here:
            if lo < self.told:
                self._open(sock)
                channel.send(sock, lo)
                self.told = lo
            return
        ready = [p for p in self.left if p.start >= lo]
        if ready:
            self._open(sock)
            del self.left[-len(ready):]
        for piece in reversed(ready):
            for row in self.values:
                for _, r in self.part.segments(piece.start, piece.stop):
                    channel.send_array(sock, row[r.start:r.stop])  # contiguous

    def _open(self, sock: socket.socket) -> None:
        """The request that opens the hand-in, before its first columns."""
        if not self.opened:
            self.links.catch_up(sock, self.address)  # the last hand-in's answer comes before this one's
            channel.send(sock, self.request)
            self.opened = True
