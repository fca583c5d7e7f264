"""Shared memory (distributed/shm.py): the per-step vectors of a run on one machine, without copies.

What it must keep: the same bits as the object store, rows of one step never shared by two
calls, and no file left behind.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import train_config

from distbp.distributed import shm
from distbp.loops.sync import train

pytestmark = pytest.mark.skipif(not shm.available(), reason="no /dev/shm")


@pytest.fixture
def board():
    b = shm.open_board(10, np.float32)
    yield b
    shm.close_board(b)


def test_a_block_written_in_one_mapping_is_read_in_another(board):
    writer, reader = shm.Maps(), shm.Maps()
    w = writer.view(board.weights, writable=True)
    assert w.dtype == np.float32 and w.shape == (10,)
    w[:] = np.arange(10, dtype=np.float32)
    seen = reader.view(board.weights)
    np.testing.assert_array_equal(seen, np.arange(10, dtype=np.float32))
    assert not seen.flags.writeable  # a reader cannot write the weights by mistake
    with pytest.raises(ValueError):
        seen[0] = 1
    # an offset block is its own slice of the file
    part = shm.Block(board.weights.path, (2, 3), board.weights.dtype, offset=4)
    np.testing.assert_array_equal(reader.view(part), np.arange(4, 10, dtype=np.float32).reshape(2, 3))


def test_rows_of_one_step_are_distinct_and_a_new_step_reuses_them(board):
    maps = shm.Maps()
    rows = shm.Rows(board, maps, width=5, dtype=np.float64)
    a, va = rows.take(step=1, rows=1)
    b, vb = rows.take(step=1, rows=2)  # a second call of the same step (a backup): the file grows
    va[:] = 1.0
    vb[:] = 2.0
    reader = shm.Maps()
    assert (reader.view(a) == 1.0).all() and (reader.view(b) == 2.0).all()  # neither overwrote the other
    assert a.path != b.path and os.path.exists(a.path)  # the first file is kept while its step lasts
    c, vc = rows.take(step=2, rows=2)  # a new step: the servers are done with step 1
    assert not os.path.exists(a.path)  # the outgrown file is removed...
    assert (c.path, c.offset) == (b.path, 0)  # ...and the current one reused from row 0
    d, _ = rows.take(step=2, rows=1)
    assert d.path != c.path or d.offset >= c.offset + 2 * 5  # rows taken in a step are never handed out twice
    assert vc.dtype == np.float64 and vc.shape == (2, 5)


def test_a_closed_board_leaves_nothing(board):
    extra = board.new("nodes-", (3, 4), np.float64)
    assert os.path.getsize(extra.path) == 3 * 4 * 8
    shm.close_board(board)
    assert not os.path.exists(board.root)


def test_boards_of_dead_drivers_are_swept_and_live_ones_kept(board):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = os.path.join(shm.ROOT, f"{shm.PREFIX}{int(gone.stdout)}-test")
    os.makedirs(stale)
    open(os.path.join(stale, "weights-x.bin"), "wb").close()
    other = shm.open_board(4, np.float64)  # sweeps first
    try:
        assert not os.path.exists(stale)
        assert os.path.exists(board.root)  # this process is alive: its board stays
    finally:
        shm.close_board(other)


def test_shared_memory_object_store_and_sockets_give_the_same_bits(ray_session, tmp_path):
    """Every transport path: S = 1 and 2, a straggler whose share is redone as a backup (so one
    worker runs two calls in a step), Adam; then the object store and the sockets for the same runs."""
    options = [dict(workers=2, servers=1), dict(workers=3, servers=2),
               dict(workers=2, servers=1, fault_injection="delay-worker:0@3:1.5")]
    common = dict(batch_size=60, micro_batch=8, steps=6, optimizer="adam")
    shared = [train(train_config(tmp_path, **o, **common, transport="shared-memory")) for o in options]
    stored = [train(train_config(tmp_path, **o, **common, transport="object-store")) for o in options]
    sockets = [train(train_config(tmp_path, **o, **common, transport="socket")) for o in options]
    mixed = [train(train_config(tmp_path, **o, **common)) for o in options]  # auto: windows over memfds
    assert {s["transport"] for s in shared} == {"shared-memory"}
    assert {s["transport"] for s in stored} == {"object-store"}
    assert {s["transport"] for s in sockets} == {"socket"}
    assert {s["transport"] for s in mixed} == {"socket+shared-memory"}
    assert shared[2]["faults"]["backups"] >= 1 and sockets[2]["faults"]["backups"] >= 1
    assert mixed[2]["faults"]["backups"] >= 1  # the stalled step went one by one, with a backup
    assert len({s["weights_sha256"] for s in shared + stored + sockets + mixed}) == 1
    leftover = [n for n in os.listdir(shm.ROOT) if n.startswith(f"{shm.PREFIX}{os.getpid()}-")]
    assert leftover == []  # every run removed its board
