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
from collections.abc import Callable

import numpy as np

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that does not complete the handshake by then is dropped
CHALLENGE_BYTES = 32
BUFFER_BYTES = 4 << 20  # socket buffers: a few of them hold a layer of a large network


class Refused(ConnectionError):
    """The peer does not hold the run's key (or is not a distbp peer at all)."""


def new_key() -> bytes:
    """The key of one run: 32 random bytes."""
    return os.urandom(32)


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _fill(sock, memoryview(buf))
    return bytes(buf)


def _fill(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if not got:
            raise EOFError("the peer closed the connection")
        view = view[got:]


def _mac(key: bytes, role: bytes, challenge: bytes) -> bytes:
    return hmac.digest(key, b"distbp " + role + b" " + challenge, "sha256")


def challenge(sock: socket.socket, key: bytes) -> None:
    """The listening end: the peer must answer a random challenge with its HMAC-SHA256 under
    ``key`` (Refused if not) before this end answers anything of the peer's, so a peer without
    the key never gets a MAC it could replay elsewhere."""
    mine = os.urandom(CHALLENGE_BYTES)
    sock.sendall(mine)
    if not hmac.compare_digest(_exact(sock, 32), _mac(key, b"client", mine)):
        raise Refused("the peer does not hold the run's key")
    sock.sendall(_mac(key, b"server", _exact(sock, CHALLENGE_BYTES)))


def answer(sock: socket.socket, key: bytes) -> None:
    """The connecting end: answer the listener's challenge, then check the listener holds ``key`` too."""
    sock.sendall(_mac(key, b"client", _exact(sock, CHALLENGE_BYTES)))
    mine = os.urandom(CHALLENGE_BYTES)
    sock.sendall(mine)
    if not hmac.compare_digest(_exact(sock, 32), _mac(key, b"server", mine)):
        raise Refused("the listener does not hold the run's key")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests go out at once
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)


def connect(address: tuple[str, int], key: bytes) -> socket.socket:
    """A connection to ``address`` whose peer proved it holds ``key``."""
    sock = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT_S)
    try:
        answer(sock, key)
        sock.settimeout(None)
        _tune(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def send(sock: socket.socket, message: tuple) -> None:
    data = pickle.dumps(message)
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv(sock: socket.socket) -> tuple:
    (n,) = struct.unpack("!I", _exact(sock, 4))
    return pickle.loads(_exact(sock, n))  # noqa: S301 - the peer proved it holds the run's key


def send_array(sock: socket.socket, array: np.ndarray) -> None:
    """The raw bytes of a C-contiguous array, from its own memory."""
    sock.sendall(memoryview(array).cast("B"))


def recv_array(sock: socket.socket, out: np.ndarray) -> None:
    """Exactly ``out.nbytes`` bytes, straight into ``out`` (C-contiguous)."""
    _fill(sock, memoryview(out).cast("B"))


class Listener:
    """A listener on ``host`` (port chosen by the system) that serves each authenticated
    connection on a thread of its own with ``serve(sock)`` until the peer leaves."""

    def __init__(self, host: str, key: bytes, serve: Callable[[socket.socket], None]):
        self.key, self.serve = key, serve
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        self.refused = 0  # connections dropped at the handshake
        threading.Thread(target=self._accept, daemon=True, name="distbp-listener").start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True, name="distbp-peer").start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                challenge(sock, self.key)
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
        self.sock.close()
