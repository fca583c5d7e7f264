"""The direct transport: authenticated connections (channel.py) and its two ways (direct.py).

The cross-node runs (one worker per Ray node of a real 2-node cluster) are in
tests/test_bench_nodes.py and tests/test_cluster.py; the bits of every path, sockets on one
node among them, are tests/test_equivalence.py's.
"""

import socket
import threading
import time

import numpy as np
import pytest

from distbp.distributed import channel
from distbp.lecture import tree


@pytest.fixture
def echo():
    """A Listener that answers each message with itself, and then an array of 3 float32."""
    key = channel.new_key()

    def serve(sock):
        while True:
            message = channel.recv(sock)
            channel.send(sock, message)
            channel.send_array(sock, np.arange(3, dtype=np.float32))

    post = channel.Listener("127.0.0.1", key, serve)
    yield post, key
    post.close()


def test_a_peer_with_the_key_talks(echo):
    post, key = echo
    with channel.connect(post.address, key) as sock:
        channel.send(sock, ("hello", 7))
        assert channel.recv(sock) == ("hello", 7)
        out = np.empty(3, np.float32)
        channel.recv_array(sock, out)
        assert out.tolist() == [0, 1, 2]
    assert post.refused == 0


def test_a_peer_with_another_key_is_refused(echo):
    post, _ = echo
    with pytest.raises((channel.Refused, EOFError, ConnectionError)):
        with channel.connect(post.address, channel.new_key()) as sock:
            channel.send(sock, ("hello",))
            channel.recv(sock)
    deadline = time.monotonic() + 5
    while post.refused < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert post.refused == 1


def test_a_peer_without_the_handshake_gets_nothing(echo):
    """A plain TCP client sending a message as a keyed peer would: the post reads it as a bad
    answer to its challenge, closes, and sends nothing but the challenge."""
    post, _ = echo
    with socket.create_connection(post.address, timeout=5) as sock:
        got = b""
        while len(got) < channel.CHALLENGE_BYTES:
            got += sock.recv(channel.CHALLENGE_BYTES - len(got))
        sock.sendall(b"\0" * 64)  # where the answer and its own challenge should be
        rest = b""
        try:
            while chunk := sock.recv(4096):
                rest += chunk
        except ConnectionResetError:  # closed with our bytes unread: a reset instead of an end of file
            pass
    assert rest == b""  # no answer to anything: the connection was closed
    assert post.refused == 1


def test_the_post_listens_on_its_host_only(echo):
    post, _ = echo
    assert post.address[0] == "127.0.0.1" and post.sock.getsockname()[0] == "127.0.0.1"


def test_a_silent_peer_does_not_block_others(echo):
    post, key = echo
    with socket.create_connection(post.address):  # connects and says nothing
        done = []
        thread = threading.Thread(target=lambda: done.append(channel.connect(post.address, key).close()))
        thread.start()
        thread.join(5)
        assert done == [None]


def test_a_worker_shares_memory_with_a_server_of_its_node_and_pushes_to_one_of_another(ray_session):
    """The direct transport, both ends in this process: the server "of another node" (its handle
    names another node) gets the worker's columns over its socket, the one of this node reads
    them in place from the worker's memfd; each server gets exactly its columns."""
    from dataclasses import replace

    from distbp.distributed.direct import Direct

    transport = Direct(10, np.float64, 2, edges=[0, 6, 10])  # two layers: a slice of each
    servers = [transport.server_end(s) for s in range(2)]
    assert [server.part.runs for server in servers] == [(range(0, 3), range(6, 8)), (range(3, 6), range(8, 10))]
    for server in servers:
        server.own(np.arange(10, dtype=np.float64))
    here, there = (server.publish(server.weights) for server in servers)
    there = replace(there, node="another node")  # the same server, as if on another node
    worker = transport.worker_end()
    values = worker.rows(1, 2)
    flat = worker.weights((here, there), ahead=(1, 0))
    worker.arrival.wait(10)  # each range comes in on a thread of its own
    np.testing.assert_array_equal(flat, np.arange(10))
    meta = ([0.5, 0.25], [1.0, 2.0], 0.1)

    def compute(done, arrival):  # the worker's backward pass: the top columns first, each range said done
        for lo, hi in ((6, 10), (0, 6)):
            values[:, lo:hi] = np.arange(20, dtype=np.float64).reshape(2, 10)[:, lo:hi]
            done(lo, hi)
        return meta
    assert worker.hand_in(values, "k", compute) == meta
    worker.read_answers()  # every hand-in taken
    assert servers[0].inbox.entries["k"].block is not None  # in place: only a handle
    assert servers[1].inbox.entries["k"].block is None  # over the socket
    for server in servers:
        part = server.part
        server.board.begin_window(1)
        (got,), metas, ready = server.collect(["k"], 1, 2, [tree.blocks(range(2), 2)])
        assert ready(0, len(part)) and metas() == [meta]
        np.testing.assert_array_equal([row[0:len(part)] for row in got], part.take(values))
        server.board.end_window()
    servers[0].weights[:] = -1.0  # a server's update is what the worker of its node reads next
    flat = worker.weights((here, there), ahead=(2, 0))
    worker.arrival.wait(10)
    assert (servers[0].part.take(flat) == -1.0).all() and (servers[1].part.take(flat) != -1.0).all()
    worker.hand_in(values, "k2", lambda done, arrival: meta)  # the pulls of the step end with its hand-in


def test_a_worker_sends_each_layer_while_it_computes_the_layers_below(ray_session, monkeypatch):
    """The overlap of communication with backprop: a layer's columns reach a server across a socket
    while the worker still computes (before ``compute`` returns), top layer first, and the server
    may sum them then; the meta comes with the last.  A compute that fails drops the push under
    way: the server never takes a partial entry for a whole one."""
    from distbp.distributed import direct

    size = 3 * direct.PIECE_BYTES // 8 + 5  # four pieces of float64
    monkeypatch.setattr(direct.Direct, "within_node", False)  # every pair over a socket
    transport = direct.Direct(size, np.float64, 1)
    server = transport.server_end(0)
    server.own(np.zeros(size))
    worker = transport.worker_end()
    assert worker.weights((server.publish(server.weights),), ahead=(1, 0)) is not None
    rows = np.arange(2 * size, dtype=np.float64).reshape(2, size)
    top = direct.pieces(size, 8)[-2].start  # "the top layer": the last two pieces
    seen = []

    def compute(done, arrival):
        values[:, top:] = rows[:, top:]
        done(top, size)
        server.board.begin_window(1)
        (got,), metas, ready = server.collect(["k"], 1, 2, [tree.blocks(range(2), 2)])
        seen.append(ready(top, size))  # in while the layer below is still to be computed
        np.testing.assert_array_equal(got[:, top:], rows[:, top:])
        seen.append((ready, metas))
        values[:, :top] = rows[:, :top]
        done(0, top)
        return "meta"
    values = worker.rows(1, 2)
    assert worker.hand_in(values, "k", compute) == "meta" and seen[0] is True
    worker.read_answers()
    ready, metas = seen[1]
    assert ready(0, top) and metas() == ["meta"]  # the rest, and the meta, once compute returned
    server.board.end_window()

    def fails(done, arrival):
        values[:, top:] = rows[:, top:]
        done(top, size)
        raise MemoryError("a compute that fails")
    values = worker.rows(2, 2)
    with pytest.raises(MemoryError):
        worker.hand_in(values, "failed", fails)
    deadline = time.monotonic() + 10
    while "failed" not in server.inbox.entries and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.inbox.entries["failed"].complete  # never summed: no step waits for it
    values = worker.rows(3, 2)
    assert worker.weights((server.publish(server.weights),), ahead=(1, 0)) is not None  # a new connection
    assert worker.hand_in(values, "next", lambda done, arrival: "meta") == "meta"
    worker.read_answers()
    assert server.inbox.entries["next"].complete


def test_a_worker_starts_on_the_weights_in_while_the_rest_is_updated(ray_session):
    """The pull side's overlap: a worker's ``weights`` returns once every server has answered (one
    of another node as it starts its update, one of this node once it is done), its ``arrival``
    says which columns are in (those of the server of this node, then those of the other as their
    bytes land), a wait for the rest lasts until that server has updated it, and the buffer then
    holds the new weights.  A server that stops mid-update fails the wait with PeerLost, and the
    step's hand-in with it."""
    from dataclasses import replace

    from distbp.distributed.direct import Direct, PeerLost

    size = 100_000
    transport = Direct(size, np.float64, 2, wait_s=1.0)
    servers = [transport.server_end(s) for s in range(2)]
    for server in servers:
        server.own(np.zeros(size))
    here, there = (server.publish(server.weights) for server in servers)
    there = replace(there, node="another node")  # over its socket, as if on another node
    worker = transport.worker_end()
    new = np.arange(size, dtype=np.float64) + 1.0
    near, far = servers[0].part.runs[0], servers[1].part.runs[0]  # one layer: a run each

    def update(server, lo: int, hi: int, step: int = 1) -> None:  # a chunk updated (the server's columns)
        server.weights[lo:hi] = new[server.part.runs[0].start + lo:server.part.runs[0].start + hi]
        server.board.updated(step, (lo, hi))
    for server in servers:
        server.board.begin_window(1)
    pulled: list = []
    pulling = threading.Thread(target=lambda: pulled.append(worker.weights((here, there), ahead=(1, 1))))
    pulling.start()
    cut = 1000
    update(servers[1], 0, cut)  # the other node's server starts its update
    update(servers[0], 0, cut)
    pulling.join(0.3)
    assert pulling.is_alive()  # this node's server has not finished its update
    update(servers[0], cut, len(near))
    servers[0].applied(1)
    pulling.join(10)
    (flat,) = pulled
    worker.arrival.wait(near.stop)
    np.testing.assert_array_equal(flat[:near.stop], new[:near.stop])
    deadline = time.monotonic() + 10
    while worker.arrival.upto[far] < far.start + cut and time.monotonic() < deadline:
        time.sleep(0.01)  # the other server's first chunk comes over its socket
    np.testing.assert_array_equal(flat[far.start:far.start + cut], new[far.start:far.start + cut])
    assert worker.arrival.has(far.start + cut) and not worker.arrival.has(size)
    waiting = threading.Thread(target=worker.arrival.wait, args=(size,))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # the rest is still being updated
    update(servers[1], cut, len(far))
    servers[1].applied(1)
    waiting.join(10)
    assert not waiting.is_alive() and worker.arrival.has(size)
    np.testing.assert_array_equal(flat, new)
    values = worker.rows(2, 1)
    assert worker.hand_in(values, "k", lambda done, arrival: "meta") == "meta"
    for server in servers:
        server.board.end_window()
        server.board.begin_window(2)
    servers[0].applied(2)
    update(servers[1], 0, cut, step=2)  # step 2's update starts, and server 1 stops in it
    flat = worker.weights((here, there), ahead=(2, 2))

    def compute(done, arrival):
        arrival.wait(size)
        return "meta"
    values = worker.rows(3, 1)
    with pytest.raises(PeerLost):  # server 1 gives up on its update's next chunk after wait_s
        worker.hand_in(values, "k", compute)
    assert not worker.pulling  # every pull ended with the call


def test_a_window_sums_a_push_piece_by_piece_and_streams_the_weights_chunk_by_chunk(ray_session, monkeypatch):
    """In a window, a server's step starts on a push as soon as it starts: ``ready`` says yes for
    the columns in so far (a push comes from the top), waits for the rest, and says no once the
    window is called off.  A pull after a step is answered when the update starts, each chunk as
    it holds its new weights."""
    from distbp.distributed import direct

    size = 3 * direct.PIECE_BYTES // 8 + 5  # four pieces of float64, the last one short
    monkeypatch.setattr(direct.Direct, "within_node", False)  # the server's range in its own memory
    transport = direct.Direct(size, np.float64, 1)
    server = transport.server_end(0)
    server.own(np.zeros(size))
    board, pieces = server.board, direct.pieces(size, 8)
    board.begin_window(1)
    first = pieces[-1]  # a push goes from the top
    with channel.connect(server.post.address, transport.key) as sock:
        rows = np.arange(2 * size, dtype=np.float64).reshape(2, size)
        channel.send(sock, direct.Push("k", 1, 2))
        for row in rows:
            channel.send_array(sock, row[first.start:first.stop])  # the first piece only
        values, metas, ready = server.collect(["k"], 1, 2, [tree.blocks(range(2), 2)])
        assert ready(first.start, size) and metas() == [None]  # the meta comes last
        np.testing.assert_array_equal(values[0][:, first.start:], rows[:, first.start:])
        waited: list[bool] = []
        waiting = threading.Thread(target=lambda: waited.append(ready(0, first.start)))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()  # the rest has not come
        board.call_off(1)  # as the driver's ParameterServer.call_off does
        waiting.join(10)
        assert waited == [False]
    board.end_window()

    board.begin_window(2)
    new = np.arange(size, dtype=np.float64) + 1.0
    cut = pieces[1].start
    with channel.connect(server.post.address, transport.key) as sock:
        sock.settimeout(10)  # a chunk that does not come fails the test instead of hanging it
        channel.send(sock, direct.Reached(2, 1, True))
        time.sleep(0.2)
        server.weights[:cut] = new[:cut]
        board.updated(1, (0, cut))  # the update of step 1 has started: its first chunk is done
        assert channel.recv(sock) == direct.Reply(True)
        got = np.empty(size)
        channel.recv_array(sock, got[:cut])
        np.testing.assert_array_equal(got[:cut], new[:cut])
        server.weights[cut:] = new[cut:]
        board.updated(1, (cut, size))
        server.applied(1)
        channel.recv_array(sock, got[cut:])
        np.testing.assert_array_equal(got, new)
    board.end_window()
