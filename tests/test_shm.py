"""Shared memory between the actors of one node (distributed/shm.py): memfds, their mappings,
and the rows a worker computes into.

What it must keep: what one process writes another reads, read-only where it only reads;
rows of one step never shared by two calls; nothing left once the memfd is closed.
"""

import os

import numpy as np
import pytest

from distbp.distributed import shm

pytestmark = pytest.mark.skipif(not shm.memfd_available(), reason="no memfds (Linux only)")


@pytest.fixture
def memory():
    made = shm.Memfds()
    yield made
    for block in list(made.fds):
        made.remove(block)


def test_a_block_written_in_one_mapping_is_read_in_another(memory):
    block = memory.new("weights-", (10,), np.float32)
    writer, reader = shm.Maps(), shm.Maps()
    w = writer.view(block, writable=True)
    assert w.dtype == np.float32 and w.shape == (10,)
    w[:] = np.arange(10, dtype=np.float32)
    seen = reader.view(block)
    np.testing.assert_array_equal(seen, np.arange(10, dtype=np.float32))
    assert not seen.flags.writeable  # a reader cannot write the weights by mistake
    with pytest.raises(ValueError):
        seen[0] = 1
    # an offset block is its own slice of the memory
    part = shm.Region(block.path, (2, 3), block.dtype, offset=4, tag=block.tag)
    np.testing.assert_array_equal(reader.view(part), np.arange(4, 10, dtype=np.float32).reshape(2, 3))


def tags(memory) -> set[str]:
    return {block.tag for block in memory.fds}


def test_rows_of_one_step_are_distinct_and_a_new_step_reuses_them(memory):
    maps = shm.Maps()
    rows = shm.Rows(memory, maps, width=5, dtype=np.float64)
    a, va = rows.take(step=1, rows=1)
    b, vb = rows.take(step=1, rows=2)  # a second call of the same step (a backup): new memory
    va[:] = 1.0
    vb[:] = 2.0
    reader = shm.Maps()
    assert (reader.view(a) == 1.0).all() and (reader.view(b) == 2.0).all()  # neither overwrote the other
    assert a.tag != b.tag and a.tag in tags(memory)  # the first memfd is kept while its step lasts
    c, vc = rows.take(step=2, rows=2)  # a new step: the servers are done with step 1
    assert a.tag not in tags(memory)  # the outgrown memfd is closed...
    assert (c.tag, c.offset) == (b.tag, 0)  # ...and the current one reused from row 0
    d, _ = rows.take(step=2, rows=1)
    assert d.tag != c.tag or d.offset >= c.offset + 2 * 5  # rows taken in a step are never handed out twice
    assert vc.dtype == np.float64 and vc.shape == (2, 5)


def test_a_closed_memfd_leaves_no_descriptor(memory):
    block = memory.new("nodes-", (3, 4), np.float64)
    fd = memory.fds[block]
    assert os.fstat(fd).st_size == 3 * 4 * 8
    memory.remove(block)
    with pytest.raises(OSError):
        os.fstat(fd)
