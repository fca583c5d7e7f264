"""Authenticated TCP connections between actors: the wire of the direct transport between nodes.

A server listens on its node's Ray address (the interface Ray itself uses there, never
0.0.0.0); the workers and the driver connect to it (direct.py).  What one connection moves
against Ray's object store is measured in docs/performance.md (scripts/channel_probe.py).

Every connection proves that its peer holds the run's key before anything else is read: the
listening end sends a random challenge and checks the peer's HMAC-SHA256 of it (``challenge``)
before it answers the peer's own challenge (``answer``), as the standard library's
``multiprocessing.connection`` does, with SHA-256, a constant-time comparison and each end's
role in the MAC.  That is why it is not ``multiprocessing.connection`` itself: on Python 3.11,
the oldest distbp runs on, its handshake is HMAC-MD5 compared with ``==``.  The key
is made for the run by the driver (``os.urandom``) and reaches the actors inside their Ray
call arguments, over Ray's own authenticated channel.  A peer without it is dropped having
been sent nothing but the challenge.

Nothing a peer without the key does can switch the listener off or hold it for long: a failed
accept (out of descriptors, a connection aborted) is tried again after a short pause, and only
``close`` ends the listening; a peer has ``HANDSHAKE_S`` in all to prove it holds the key; at
most ``PENDING_MAX`` handshakes are under way at once, and a connection beyond them is closed at
once, without a thread.  A connecting end that the listener turns away so (closed before its
challenge) tries again until its own deadline (``connect``'s ``within``); one that nothing listens
at, or that holds another key, fails at once.

On the wire: a message is a 4-byte length and a pickle of a small request or reply (direct.py's
dataclasses; only after the handshake, so only from a peer that holds the key); an array is its raw bytes, written from
and read into numpy buffers in place (``send_array`` / ``recv_array``: no copy on either side).

No Ray here: sockets, hmac, numpy.
"""

from __future__ import annotations

import hmac
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

# A handshake is two round trips of 32 bytes: a peer that has not completed it within this is
# dropped, so one without the key holds a thread and a descriptor no longer than this.
HANDSHAKE_S = 2.0
# Handshakes under way at once: past them a new connection is closed at once, without a thread.
# Far above what a run opens at once (one connection per worker and server, kept), far below a
# process's descriptor limit (Linux's default soft limit is 1024).
PENDING_MAX = 32
BACKOFF_S = (0.01, 0.5)  # a failed accept, or a connection turned away, is tried again after 10 ms, doubling to 0.5 s
CONNECT_S = 10.0  # a TCP connect gives up after this (a node that is gone); connect's default ``within``
CHALLENGE_BYTES = 32
BUFFER_BYTES = 4 << 20  # socket buffers: a few of them hold a layer of a large network


class Refused(ConnectionError):
    """The peer does not hold the run's key (or is not a distbp peer at all)."""


class TurnedAway(ConnectionError):
    """The listener closed the connection, or said nothing, before its challenge (it is full)."""


def new_key() -> bytes:
    """The key of one run: 32 random bytes."""
    return os.urandom(32)


def _exact(sock: socket.socket, n: int, until: float | None = None) -> bytes:
    buf = bytearray(n)
    _fill(sock, memoryview(buf), until)
    return bytes(buf)


def _fill(sock: socket.socket, view: memoryview, until: float | None = None,
          came: Callable[[int], None] | None = None) -> None:
    """Fill ``view`` from ``sock``; with ``until`` (a ``time.monotonic()``), TimeoutError once it
    has passed, however the peer trickles its bytes; ``came(n)``, if given, hears the bytes in so
    far after each receive."""
    total = 0
    while view:
        if until is not None:
            left = until - time.monotonic()
            if left <= 0:
                raise TimeoutError("the handshake did not complete in time")
            sock.settimeout(left)
        got = sock.recv_into(view)
        if not got:
            raise EOFError("the peer closed the connection")
        view = view[got:]
        if came is not None:
            total += got
            came(total)


def _mac(key: bytes, role: bytes, challenge: bytes) -> bytes:
    return hmac.digest(key, b"distbp " + role + b" " + challenge, "sha256")


def challenge(sock: socket.socket, key: bytes, until: float | None = None) -> None:
    """The listening end: the peer must answer a random challenge with its HMAC-SHA256 under
    ``key`` (Refused if not) before this end answers anything of the peer's, so a peer without
    the key never gets a MAC it could replay elsewhere.  ``until``: the handshake's deadline."""
    mine = os.urandom(CHALLENGE_BYTES)
    sock.sendall(mine)
    if not hmac.compare_digest(_exact(sock, 32, until), _mac(key, b"client", mine)):
        raise Refused("the peer does not hold the run's key")
    sock.sendall(_mac(key, b"server", _exact(sock, CHALLENGE_BYTES, until)))


def answer(sock: socket.socket, key: bytes, until: float | None = None) -> None:
    """The connecting end: answer the listener's challenge, then check the listener holds ``key``
    too.  TurnedAway if the challenge does not come (by ``until``): the listener is full."""
    try:
        theirs = _exact(sock, CHALLENGE_BYTES, until)
    except (EOFError, ConnectionResetError, TimeoutError) as exc:
        raise TurnedAway(f"the listener sent no challenge ({exc})") from None
    sock.sendall(_mac(key, b"client", theirs))
    mine = os.urandom(CHALLENGE_BYTES)
    sock.sendall(mine)
    if not hmac.compare_digest(_exact(sock, 32, until), _mac(key, b"server", mine)):
        raise Refused("the listener does not hold the run's key")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests go out at once
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)


def connect(address: tuple[str, int], key: bytes, within: float = CONNECT_S,
            timeout: float | None = None) -> socket.socket:
    """A connection to ``address`` whose peer proved it holds ``key``.

    A listener that turns the connection away (TurnedAway: it is full, Listener) is tried again
    until ``within`` seconds have passed; a refused or timed-out TCP connect (nothing listens
    there, the node is gone) and a peer with another key (Refused) fail at once.  ``timeout``:
    each later send or receive on the connection gives up after this many seconds (None: never)."""
    until, pause = time.monotonic() + within, BACKOFF_S[0]
    while True:
        left = until - time.monotonic()
        sock = socket.create_connection(address, timeout=min(CONNECT_S, max(left, HANDSHAKE_S)))
        try:
            answer(sock, key, until=time.monotonic() + max(left, HANDSHAKE_S))
            sock.settimeout(timeout)
            _tune(sock)
            return sock
        except TurnedAway as exc:
            sock.close()
            if time.monotonic() + pause > until:
                raise TurnedAway(f"{address[0]}:{address[1]} turned every connection away for {within:g} s "
                                 f"({exc})") from None
        except BaseException:
            sock.close()
            raise
        time.sleep(pause)
        pause = min(2 * pause, BACKOFF_S[1])


def send(sock: socket.socket, message: tuple) -> None:
    data = pickle.dumps(message)
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv(sock: socket.socket) -> tuple:
    (n,) = struct.unpack("!I", _exact(sock, 4))
    return pickle.loads(_exact(sock, n))  # noqa: S301 - the peer proved it holds the run's key


def send_array(sock: socket.socket, array: np.ndarray) -> None:
    """The raw bytes of a C-contiguous array, from its own memory."""
    sock.sendall(memoryview(array).cast("B"))


def recv_array(sock: socket.socket, out: np.ndarray, came: Callable[[int], None] | None = None) -> None:
    """Exactly ``out.nbytes`` bytes, straight into ``out`` (C-contiguous); ``came(n)``, if given,
    hears the whole entries in so far as each run of bytes lands."""
    _fill(sock, memoryview(out).cast("B"), came=None if came is None else lambda got: came(got // out.itemsize))


class Listener:
    """A listener on ``host`` (port chosen by the system) that serves each authenticated
    connection on a thread of its own with ``serve(sock)`` until the peer leaves.  It listens
    until ``close``, whatever an accept meets."""

    def __init__(self, host: str, key: bytes, serve: Callable[[socket.socket], None]):
        self.key, self.serve = key, serve
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        self.refused = 0  # connections dropped at the handshake
        self.turned_away = 0  # connections closed at once: PENDING_MAX handshakes were under way
        self.failed = 0  # accepts that failed (and were tried again)
        self.closed = False
        self.pending = threading.BoundedSemaphore(PENDING_MAX)  # a slot for each handshake under way
        self.thread = threading.Thread(target=self._accept, daemon=True, name="distbp-listener")
        self.thread.start()

    def _accept(self) -> None:
        """Accept until ``close``.  A failed accept (EMFILE, ENFILE, ENOBUFS, ECONNABORTED, ...)
        is tried again after a pause (``BACKOFF_S``, doubling): meanwhile handshakes end and
        free their descriptors, and the connections waiting stay in the kernel's queue."""
        pause = BACKOFF_S[0]
        while not self.closed:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                if self.closed:
                    return
                self.failed += 1
                time.sleep(pause)
                pause = min(2 * pause, BACKOFF_S[1])
                continue
            pause = BACKOFF_S[0]
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        """A thread for ``sock``'s handshake, if one of the PENDING_MAX slots is free; else (or
        with no thread to be had) the connection is closed at once."""
        if self.pending.acquire(blocking=False):
            try:
                threading.Thread(target=self._serve, args=(sock,), daemon=True, name="distbp-peer").start()
                return
            except RuntimeError:  # can't start new thread
                self.pending.release()
        self.turned_away += 1
        sock.close()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                try:
                    challenge(sock, self.key, until=time.monotonic() + HANDSHAKE_S)
                finally:
                    self.pending.release()
                sock.settimeout(None)
                _tune(sock)
            except (OSError, EOFError, Refused):
                self.refused += 1
                return
            try:
                self.serve(sock)
            except (OSError, EOFError):  # the peer left (a worker died, the run ended)
                pass

    def close(self) -> None:
        """Stop listening (the accept under way wakes up and ends); connections served go on."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept (Linux); close alone does not
        except OSError:
            pass
        self.sock.close()
