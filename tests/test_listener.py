"""The listener stays up, and no peer holds anything for long ("nothing lost, nothing hung").

A failed accept (a process out of descriptors) used to switch the listener off for good; a
peer without the key could hold a thread and a descriptor for 10 s, as many as it liked; and a
window's waits on its peers gave up after a fixed 600 s.  Here: the listener tries again after
any failed accept, a handshake has HANDSHAKE_S in all, at most PENDING_MAX are under way, and
every wait on a peer ends by the deadline the run gives its transport (``Direct.wait_s``).
None of these tests starts Ray.
"""

import errno
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from distbp.distributed import channel
from distbp.distributed.board import Board
from distbp.distributed.inbox import Inbox


def echo_listener(key):
    """A Listener that answers each message with itself."""
    def serve(sock):
        while True:
            channel.send(sock, channel.recv(sock))
    return channel.Listener("127.0.0.1", key, serve)


def talks(address, key, **within) -> float:
    """Seconds an authenticated connect (``within``: as connect takes it) and one echoed message took."""
    started = time.monotonic()
    with channel.connect(address, key, **within) as sock:
        sock.settimeout(10)
        channel.send(sock, ("hello", 1))
        assert channel.recv(sock) == ("hello", 1)
    return time.monotonic() - started


def eventually(condition, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_an_accept_that_fails_does_not_stop_the_listener(monkeypatch):
    """Each accept error a busy process meets, while a peer with the key waits to be accepted:
    the listener pauses, tries again, and the peer gets in."""
    errors = [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ECONNABORTED]
    accept = socket.socket.accept

    def failing(self):
        if errors:
            select.select([self], [], [], 10)  # as the kernel does: the error comes when a connection waits
            code = errors.pop(0)
            raise OSError(code, os.strerror(code))
        return accept(self)

    monkeypatch.setattr(socket.socket, "accept", failing)
    key = channel.new_key()
    post = echo_listener(key)
    try:
        assert talks(post.address, key) < 5
        assert errors == [] and post.failed == 4 and post.thread.is_alive()
        assert talks(post.address, key) < 5  # and it goes on listening
    finally:
        post.close()
    post.thread.join(5)
    assert not post.thread.is_alive()  # only close stops it


SERVER = textwrap.dedent("""
    import os, resource, sys
    from distbp.distributed import channel
    key = bytes.fromhex(sys.argv[1])
    def serve(sock):
        while True:
            channel.send(sock, channel.recv(sock))
    post = channel.Listener("127.0.0.1", key, serve)
    # 20 descriptors to spare: the peers below hold more than that
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
    print(post.address[1], flush=True)
    sys.stdin.readline()
    print(post.failed, flush=True)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="counts descriptors in /proc/self/fd (Linux)")
def test_a_server_out_of_descriptors_goes_on_listening():
    """The reported case: a server with few descriptors to spare (RLIMIT_NOFILE lowered) and more
    connections than that held to its port without the key; a peer with the key gets in once
    the held ones are dropped, and the listener kept listening through EMFILE."""
    key = channel.new_key()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, key.hex()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    held = []
    try:
        port = int(proc.stdout.readline())
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        time.sleep(0.5)  # the server accepts what it can, and runs out
        assert talks(("127.0.0.1", port), key) < 10
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) > 0  # it did meet EMFILE
    finally:
        for sock in held:
            sock.close()
        proc.kill()
        proc.wait()


def test_connections_without_the_key_beyond_the_cap_are_closed_at_once_and_the_rest_soon():
    """More than PENDING_MAX connections that never answer: those beyond the cap are closed at
    once, the others at HANDSHAKE_S; a peer with the key gets in within a couple of seconds."""
    key = channel.new_key()
    post = echo_listener(key)
    extra = 10
    try:
        opened = time.monotonic()
        held = [socket.create_connection(post.address) for _ in range(channel.PENDING_MAX + extra)]
        assert eventually(lambda: post.turned_away >= extra)
        assert talks(post.address, key) < channel.HANDSHAKE_S + 3
        for sock in held:
            sock.settimeout(channel.HANDSHAKE_S + 5)
            while sock.recv(64):  # the challenge, if it got one, then the end
                pass
            sock.close()
        assert time.monotonic() - opened < channel.HANDSHAKE_S + 4
        assert post.thread.is_alive()
    finally:
        post.close()


def test_a_peer_that_trickles_its_answer_is_dropped_at_the_handshake_deadline():
    """The deadline is the whole handshake's, not each byte's: one byte every half second does not
    keep a connection."""
    post = echo_listener(channel.new_key())
    try:
        with socket.create_connection(post.address, timeout=10) as sock:
            started, dropped = time.monotonic(), None
            sock.recv(channel.CHALLENGE_BYTES)
            for _ in range(31):  # one byte short of an answer
                try:
                    sock.sendall(b"\0")
                    if select.select([sock], [], [], 0.5)[0] and not sock.recv(1):  # the listener said nothing more
                        dropped = time.monotonic() - started
                except (BrokenPipeError, ConnectionResetError):
                    dropped = time.monotonic() - started
                if dropped is not None:
                    break
        assert dropped is not None and dropped < channel.HANDSHAKE_S + 2
        assert eventually(lambda: post.refused == 1)
    finally:
        post.close()


def test_a_listener_that_turns_every_connection_away_is_a_clear_error_by_the_deadline(monkeypatch):
    monkeypatch.setattr(channel, "PENDING_MAX", 0)  # every connection is beyond the cap
    key = channel.new_key()
    post = echo_listener(key)
    try:
        started = time.monotonic()
        with pytest.raises(channel.TurnedAway, match="turned every connection away for 0.5 s"):
            channel.connect(post.address, key, within=0.5)
        assert time.monotonic() - started < 2
        assert post.turned_away >= 2  # it was tried again
    finally:
        post.close()


def test_a_servers_waits_on_its_peers_end_by_the_deadline_it_was_given():
    """The waits of a server's window (the weights after a step, the workers' values) end after
    ``wait_s``, whatever it is: here 0.3 s, not 600."""
    changed = threading.Condition(threading.Lock())
    board, inbox = Board(changed, 0.3), Inbox(4, np.float64, changed, 0.3)
    board.begin_window(1)
    started = time.monotonic()
    assert board.reached(1, 5, pull=True) is False
    with pytest.raises(EOFError, match="did not come within 0.3 s"):
        board.next_chunk(0, 5, 4)
    assert inbox.wait(["a worker's values"], lambda: False, [1]) is None
    from distbp.distributed.inbox import Entry
    entry = Entry(1, inbox.buffer(2), since=4, complete=False)  # nothing of its 4 columns in yet
    assert inbox.ready([entry], lambda: False)(0, 4) is False
    assert time.monotonic() - started < 3


def test_the_run_gives_its_transport_the_elastic_timeout_as_its_deadline(monkeypatch):
    """Config.elastic_timeout, through Session's ``peer_wait``, is the deadline of the direct
    transport's actors (never below WAIT_FLOOR_S); its server ends a window's waits by it, and
    a worker takes a server silent for twice as long for lost."""
    from distbp import Config
    from distbp.distributed import direct
    from distbp.distributed.direct_worker import Links
    from distbp.distributed.transport import choose

    assert direct.peer_wait(Config().elastic_timeout) == 300.0
    assert direct.peer_wait(0.0) == direct.peer_wait(2.0) == direct.WAIT_FLOOR_S
    assert choose("direct", 10, "float64", 1, 45.0).wait_s == 45.0

    monkeypatch.setattr(direct.Direct, "within_node", False)  # no Ray node: every vector by socket
    transport = direct.Direct(8, np.float64, 1, wait_s=0.4)
    server = transport.server_end(0)
    server.own(np.zeros(8))
    server.board.begin_window(1)
    started = time.monotonic()
    with channel.connect(server.post.address, transport.key, timeout=10) as sock:
        channel.send(sock, direct.Reached(1, 3, True))  # a step the server will not reach
        assert channel.recv(sock) == direct.Reply(False)
    assert server.collect(["k"], 1, 1, [[(0, 1)]]) is None
    assert time.monotonic() - started < 3

    silent = channel.Listener("127.0.0.1", transport.key, lambda sock: sock.recv(1))  # never answers
    try:
        started = time.monotonic()
        with pytest.raises(direct.PeerLost, match="cannot be reached"):
            Links(transport.key, 0.2).talk(silent.address, lambda sock: (channel.send(sock, direct.Reached(1, 0, True)),
                                                                         channel.recv(sock)))
        assert time.monotonic() - started < 3
    finally:
        silent.close()
        server.post.close()
